"""A run's train step (and decoding) compiled for a Cloud TPU slice on any host: memory, FLOPs,
collectives, roofline. `python -m gpt_jax.aot` is its command line.

With the `libtpu` wheel installed (`pip install -e '.[tpu]'`), libtpu gives compile-only devices
of any topology, and the TPU compiler compiles exactly what `gpt_jax.train` runs there — the same
state, shardings, train step and eval step (gpt_jax/steps.py) — from abstract arrays: nothing is
allocated. Per chip it reports the compiled step's HBM (arguments + outputs + temporaries -
aliased) against the chip's, its FLOPs against the analytic count (gpt_jax/flops.py), every
collective of the optimized HLO with its bytes per step, and a roofline: the step takes no less
than the largest of FLOPs / peak, HBM bytes / HBM bandwidth and collective bytes / link
bandwidth (ICI within a slice, DCN across slices), which bounds MFU and tokens/s per chip.

--max_batch finds, by compiling, the largest global batch (a multiple of the data shards) that
fits. A step that does not fit is reported in one line, with the figure the compiler gave.
"""

import dataclasses
import math
import re
import time

import flax.linen as nn
import jax

from gpt_jax import checkpoint, decode, flops, kernels, optim, sharding
from gpt_jax.tpu import hlo
from gpt_jax.tpu import topology as tpu
from gpt_jax import config as config_lib
from gpt_jax import steps as steps_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

# Per-chip link traffic of one collective, as a multiple of its full buffer (ring algorithms):
# an all-reduce is a reduce-scatter and an all-gather.
_TRAFFIC = {'all-gather': 1, 'reduce-scatter': 1, 'all-reduce': 2, 'all-to-all': 1,
            'collective-permute': 1}


class OutOfMemory(Exception):
  """The compiler refused the step: it needs more HBM than a chip has."""

  def __init__(self, needed: float, available: float, message: str):
    super().__init__(message)
    self.needed, self.available = needed, available


def model_vocab(config) -> int:
  """config.model.vocab_size, or the size of the sentencepiece model the run would train."""
  if config.model.vocab_size:
    return config.model.vocab_size
  if config.data.tokenizer == 'sentencepiece' and not config.data.spm_model:
    return config.data.vocab_size
  raise ConfigError('Set --config.model.vocab_size: the tokenizer (and its vocabulary) is only '
                    'built by a training run')


def _bytes_per_chip(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _gigabytes(text: str) -> float:
  number, unit = float(text[:-1]), text[-1]
  return number * {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}.get(unit, 1)


def _compile(lowered):
  """lowered.compile(); a refusal for lack of HBM becomes OutOfMemory, with its figures."""
  try:
    return lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's errors have no finer type)
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'exceeds' not in message:
      raise
    found = re.search(r'\(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)',
                      message)
    needed, available = (_gigabytes(found.group(1)), _gigabytes(found.group(2))) if found else (
        math.nan, math.nan)
    line = next((l for l in message.splitlines() if 'exceeds' in l or 'RESOURCE' in l), message)
    raise OutOfMemory(needed, available, line.strip()) from None


def _memory(compiled) -> dict[str, float]:
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return {'argument_bytes': stats.argument_size_in_bytes,
          'output_bytes': stats.output_size_in_bytes, 'temp_bytes': stats.temp_size_in_bytes,
          'alias_bytes': stats.alias_size_in_bytes, 'hbm_bytes_per_chip': total}


def compile_train(config, topology: tpu.Slice, with_eval: bool = True) -> dict:
  """The report of `config`'s train step compiled for `topology` (see the module doc)."""
  config_lib.validate(config)
  config.model.vocab_size = model_vocab(config)
  config.mesh.num_slices = topology.num_slices
  devices = topology.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  steps_lib.check_batch_fits_mesh(config, mesh)
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg, config_lib.lora_config(config))
  trainable = checkpoint.trainable_params(config, None)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  steps = steps_lib.build(config, model, tx, schedule, mesh, rules, trainable)

  chip, chips = topology.chip, len(devices)
  batch, seq_len = config.data.batch_size, config.data.seq_len
  report = {
      'topology': topology.name, 'libtpu_topology': topology.topology,
      'num_slices': topology.num_slices, 'chips': chips, 'device_kind': devices[0].device_kind,
      'mesh': dict(mesh.shape), 'global_batch': batch, 'seq_len': seq_len,
      'batch_per_chip': batch / chips, 'remat': model_cfg.remat,
      'attention': kernels.attention_for(model_cfg.attention, devices[0].platform),
      'scan_layers': model_cfg.scan_layers, 'compute_dtype': model_cfg.compute_dtype,
      'num_params': sum(math.prod(x.shape) for x in jax.tree.leaves(steps.abstract_state.params)),
      'param_bytes_per_chip': _bytes_per_chip(steps.abstract_state.params),
      'optimizer_bytes_per_chip': _bytes_per_chip(steps.abstract_state.opt_state),
      'hbm_capacity_bytes': chip.hbm_bytes,
  }
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    traced = steps.train_step.trace(steps.abstract_state,
                                    steps.abstract_batch(batch, seq_len), steps.abstract_frozen,
                                    steps.abstract_inputs)
    report['flops_per_chip'] = flops.program_flops(traced.jaxpr) / chips
    try:
      compiled = _compile(traced.lower())
    except OutOfMemory as e:
      report.update(fits=False, hbm_bytes_per_chip=e.needed, error=str(e),
                    compile_s=time.perf_counter() - start)
      return report
    report['compile_s'] = time.perf_counter() - start
    if with_eval:
      eval_batch = config.data.eval_batch_size or batch
      try:
        evaluated = _compile(steps.eval_step.lower(
            steps.abstract_state.params, steps.abstract_batch(eval_batch, seq_len),
            steps.abstract_frozen))
        report['eval_hbm_bytes_per_chip'] = _memory(evaluated)['hbm_bytes_per_chip']
      except OutOfMemory as e:
        report['eval_hbm_bytes_per_chip'] = e.needed
  report.update(_memory(compiled))
  report['fits'] = report['hbm_bytes_per_chip'] <= chip.hbm_bytes and (
      report.get('eval_hbm_bytes_per_chip', 0) <= chip.hbm_bytes)
  report['hbm_margin_bytes'] = chip.hbm_bytes - report['hbm_bytes_per_chip']

  # XLA's cost analysis counts a loop's body once (a layer of a scanned model): FLOPs come from
  # the traced step's products, bytes and collectives from the optimized HLO's loops.
  tokens_per_chip = batch * seq_len / chips
  report['model_flops_per_chip'] = flops.train_flops_per_token(model_cfg, seq_len) * tokens_per_chip
  module = hlo.Module(compiled.as_text())
  report['hbm_accessed_bytes_per_chip'] = module.hbm_bytes()
  report['largest_arrays'] = [{'shape': shape, 'bytes': size, 'count': count}
                              for shape, size, count in module.largest_arrays()]
  within, across = module.collectives(), module.dcn_collectives()
  for key, found in (('collectives', within), ('dcn_collectives', across)):
    report[key] = {op: {'count': c.count, 'bytes': c.bytes} for op, c in sorted(found.items())}
  ici = sum(_TRAFFIC[op] * c.bytes for op, c in within.items())
  dcn = sum(_TRAFFIC.get(op, 1) * c.bytes for op, c in across.items())
  # The traced products miss those inside kernels (splash attention): the model's FLOPs bound
  # the work from below too.
  work = max(report['flops_per_chip'], report['model_flops_per_chip'])
  bounds = {'compute': work / chip.peak_bf16_flops,
            'hbm': report['hbm_accessed_bytes_per_chip'] / chip.hbm_bytes_per_s}
  if chip.ici_bytes_per_s:
    bounds['ici'] = ici / chip.ici_bytes_per_s
  if chip.dcn_bytes_per_s and dcn:
    bounds['dcn'] = dcn / chip.dcn_bytes_per_s
  report['roofline_bounds_s'] = bounds
  report['roofline_step_s'] = max(bounds.values())
  report['roofline_bound_by'] = max(bounds, key=bounds.get)
  report['roofline_mfu'] = (report['model_flops_per_chip']
                            / (report['roofline_step_s'] * chip.peak_bf16_flops))
  report['roofline_tokens_per_s_per_chip'] = tokens_per_chip / report['roofline_step_s']
  return report


def compile_decode(config, topology: tpu.Slice, batch: int, prompt_len: int,
                   max_new_tokens: int) -> dict:
  """Decoding as gpt_jax.sample runs it (decode.Generator: the whole loop, KV cache included),
  compiled for one chip of `topology`: its HBM, and the bound on one step's time that reading
  its bytes from HBM sets."""
  config_lib.validate(config)
  config.model.vocab_size = model_vocab(config)
  # Decoding runs the blocks one by one, from per-layer parameters in their stored dtype.
  cfg = dataclasses.replace(ModelConfig.from_config(config.model), scan_layers=False,
                            scan_unroll=1)
  if prompt_len + max_new_tokens > cfg.max_len:
    raise ConfigError(f'--decode_prompt_len + --decode_new_tokens ({prompt_len} + '
                      f'{max_new_tokens}) exceeds model.max_len ({cfg.max_len})')
  device = topology.devices()[0]
  chip_mesh = jax.sharding.Mesh([device], ('data',))
  on_chip = jax.sharding.SingleDeviceSharding(device)
  params = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(
      jax.random.key(0), jax.numpy.zeros((1, 1), 'int32'))['params']))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip),
                        params)
  with jax.set_mesh(chip_mesh):
    generator = decode.Generator(cfg, params)
    loop, step = generator.lower(batch, prompt_len, max_new_tokens)
    try:
      loop, step = _compile(loop), _compile(step)
    except OutOfMemory as e:
      return {'decode_batch': batch, 'fits': False, 'hbm_bytes_per_chip': e.needed,
              'error': str(e)}
  memory = _memory(loop)
  step_bytes = hlo.Module(step.as_text()).hbm_bytes()
  step_s = step_bytes / topology.chip.hbm_bytes_per_s
  return {'decode_batch': batch, 'prompt_len': prompt_len, 'max_new_tokens': max_new_tokens,
          'fits': memory['hbm_bytes_per_chip'] <= topology.chip.hbm_bytes, **memory,
          'step_hbm_bytes': step_bytes, 'roofline_step_s': step_s,
          'roofline_tokens_per_s': batch / step_s}


def max_batch(config, topology: tpu.Slice) -> tuple[int, dict | None]:
  """(the largest global batch that fits, its report), over multiples of the batch's unit (data
  shards x gradient-accumulation steps), by compiling. The first guess extrapolates the HBM of
  batches of one and two units; then it doubles or bisects until the bound is exact."""
  config_lib.validate(config)
  shards = sharding.mesh_shape(config.mesh, topology.chips)
  unit = shards[0] * shards[1] * config.optim.grad_accum_steps
  reports = {}

  def fits(multiple: int) -> bool:
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.data.batch_size = multiple * unit
      trial.data.eval_batch_size = 0
    reports[multiple] = compile_train(trial, topology, with_eval=False)
    return reports[multiple]['fits']

  if not fits(1):
    return 0, reports[1]
  if not fits(2):
    return unit, reports[1]
  # HBM grows about linearly with the batch: each next try interpolates (or extrapolates) the
  # two compilations that bracket the capacity most closely.
  capacity = reports[1]['hbm_capacity_bytes']
  low, high = 2, None
  while high is None or high - low > 1:
    below = max(m for m, r in reports.items() if r['fits'] and m < low) if low > 1 else 1
    near = (below, low) if high is None else (low, high)
    (m1, h1), (m2, h2) = ((m, reports[m]['hbm_bytes_per_chip']) for m in near)
    slope = (h2 - h1) / (m2 - m1)
    if slope > 0 and math.isfinite(slope):
      multiple = low + max(1, int((capacity - reports[low]['hbm_bytes_per_chip']) // slope))
    else:  # no usable figure: double, or bisect
      multiple = 2 * low if high is None else (low + high) // 2
    if high is not None:
      multiple = min(max(multiple, low + 1), high - 1)
    if fits(multiple):
      low = multiple
    else:
      high = multiple
  return low * unit, reports[low]


def summary(report: dict) -> str:
  """The report as a few lines for the terminal."""
  gb = lambda x: f'{x / 1e9:.2f} GB'
  mesh = ' x '.join(f'{axis} {size}' for axis, size in report['mesh'].items())
  slices = f"{report['num_slices']} x " if report.get('num_slices', 1) > 1 else ''
  lines = [f"{slices}{report['topology']} ({report['libtpu_topology']}, {report['chips']} chips, "
           f"{report['device_kind']}), mesh {mesh}; batch {report['global_batch']} x "
           f"{report['seq_len']} ({report['batch_per_chip']:g} sequences per chip), remat "
           f"{report['remat']}, {report['attention']} attention"]
  if 'error' in report:
    lines.append(f"does not fit: {report['error']}")
    return '\n'.join(lines)
  fit = 'fits' if report['fits'] else 'DOES NOT FIT'
  lines += [
      f"HBM per chip: {gb(report['hbm_bytes_per_chip'])} of {gb(report['hbm_capacity_bytes'])} "
      f"({fit}, margin {gb(report['hbm_margin_bytes'])}): parameters "
      f"{gb(report['param_bytes_per_chip'])}, optimizer {gb(report['optimizer_bytes_per_chip'])}"
      f", temporaries {gb(report['temp_bytes'])}"
      + (f"; eval step {gb(report['eval_hbm_bytes_per_chip'])}"
         if 'eval_hbm_bytes_per_chip' in report else ''),
      f"FLOPs per chip: {report['flops_per_chip'] / 1e12:.2f} T in the step (its traced products), "
      f"{report['model_flops_per_chip'] / 1e12:.2f} T model (analytic)",
      'collectives per step: ' + (', '.join(
          f"{op} {c['count']} x, {gb(c['bytes'])}" for op, c in report['collectives'].items())
          or 'none') + (('; across slices: ' + ', '.join(
              f"{op} {c['count']} x, {gb(c['bytes'])}"
              for op, c in report['dcn_collectives'].items())) if report['num_slices'] > 1
                        else ''),
      f"roofline: {report['roofline_step_s'] * 1e3:.1f} ms per step, bound by "
      f"{report['roofline_bound_by']} (" + ', '.join(
          f'{k} {v * 1e3:.1f} ms' for k, v in report['roofline_bounds_s'].items())
      + f"): MFU <= {report['roofline_mfu']:.1%}, "
      f"{report['roofline_tokens_per_s_per_chip']:,.0f} tokens/s per chip",
  ]
  lines.append('largest arrays: ' + ', '.join(
      f"{a['shape']} {gb(a['bytes'])}" for a in report['largest_arrays'][:4]))
  if 'decode' in report:
    d = report['decode']
    lines.append(f"decoding on one chip, {d['decode_batch']} sequences: " + (
        f"does not fit: {d['error']}" if 'error' in d else
        f"{gb(d['hbm_bytes_per_chip'])} HBM ({'fits' if d['fits'] else 'DOES NOT FIT'}), a "
        f"step reads {gb(d['step_hbm_bytes'])}: >= {d['roofline_step_s'] * 1e3:.2f} ms per "
        f"token, <= {d['roofline_tokens_per_s']:,.0f} tokens/s"))
  return '\n'.join(lines)
