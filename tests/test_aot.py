"""gpt_jax.aot: the real train step compiled for Cloud TPU slices with libtpu, on this CPU host."""

import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

pytest.importorskip('libtpu', reason='libtpu is not installed: pip install -e ".[tpu]"')

from gpt_jax import checkpoint, optim, sharding, target  # noqa: E402
from gpt_jax.tpu import topology as tpu
from gpt_jax.tpu import plan as tpu_plan
from gpt_jax import steps as steps_lib  # noqa: E402
from gpt_jax.config import base_config  # noqa: E402
from gpt_jax.errors import ConfigError  # noqa: E402
from gpt_jax.model import ModelConfig, Transformer  # noqa: E402


def small_config(batch_size=8, seq_len=256, **mesh):
  """2 layers x 256 (2 heads of 128, as TPU tiles them), RoPE, bf16 compute, scanned layers."""
  config = base_config()
  model = config.model
  model.num_layers, model.emb_dim, model.num_heads, model.mlp_dim = 2, 256, 2, 1024
  model.vocab_size, model.max_len, model.compute_dtype = 2048, seq_len, 'bfloat16'
  model.scan_layers, model.position = True, 'rope'
  config.data.seq_len, config.data.batch_size = seq_len, batch_size
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def _batch_bytes(report):
  return 2 * report['global_batch'] * report['seq_len'] * 4 / report['chips']  # int32 x 2


def test_topology_names_follow_cloud_tpu():
  assert tpu.Slice.parse('v5p-8').topology == 'v5p:2x2x1'      # 8 TensorCores: 4 chips
  assert tpu.Slice.parse('v5p-128').topology == 'v5p:4x4x4'
  assert tpu.Slice.parse('v5e-8').topology == 'v5e:2x4'        # v5e counts chips
  assert tpu.Slice.parse('v5litepod-16').topology == 'v5e:4x4'
  assert tpu.Slice.parse('v6e-256').chips == 256
  assert tpu.Slice.parse('v4-32', num_slices=2).chips == 32
  with pytest.raises(ConfigError, match='no v5p slice has 3 chips'):
    tpu.Slice.parse('v5p-6')
  with pytest.raises(ConfigError, match='Unknown TPU topology'):
    tpu.Slice.parse('v7-8')


def test_fsdp_step_on_v5p_shards_state_and_gathers_weights():
  report = tpu_plan.compile_train(small_config(), tpu.Slice.parse('v5p-8'))
  assert report['chips'] == 4 and report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert report['fits']
  # The rules put every matrix's `embed` axis over fsdp: a quarter of the state per chip (norm
  # scales, replicated, are a few KB).
  total_param_bytes = report['num_params'] * 4
  assert total_param_bytes / 4 <= report['param_bytes_per_chip'] < total_param_bytes / 4 * 1.01
  assert report['optimizer_bytes_per_chip'] == pytest.approx(
      2 * report['param_bytes_per_chip'], rel=1e-3)  # AdamW's two moments
  # What the compiler was given per chip is that state and the batch's share.
  promised = (report['param_bytes_per_chip'] + report['optimizer_bytes_per_chip']
              + _batch_bytes(report))
  assert report['argument_bytes'] == pytest.approx(promised, rel=0.01)
  # FSDP: weights all-gathered, the layers' gradients reduce-scattered. Of the parameters,
  # only the token embedding's gradient (summed from a lookup) may be all-reduced whole.
  collectives = report['collectives']
  assert collectives['all-gather']['count'] >= 7 * 2 and collectives['reduce-scatter']['count']
  embedding_bytes = 2048 * 256 * 4
  assert collectives.get('all-reduce', {'bytes': 0})['bytes'] < (
      embedding_bytes + 0.01 * total_param_bytes)
  assert report['flops_per_chip'] >= report['model_flops_per_chip'] * 0.7
  assert 0 < report['roofline_mfu'] <= 1


def test_tensor_parallel_step_on_v5e_shards_heads_and_mlp():
  report = tpu_plan.compile_train(small_config(tensor=2, fsdp=2), tpu.Slice.parse('v5e-4'),
                             with_eval=False)
  assert report['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 2}
  # Matrices split over both axes: `embed` over fsdp; heads, MLP and vocabulary over tensor.
  total_param_bytes = report['num_params'] * 4
  assert total_param_bytes / 4 <= report['param_bytes_per_chip'] < total_param_bytes / 4 * 1.01
  promised = (report['param_bytes_per_chip'] + report['optimizer_bytes_per_chip']
              + _batch_bytes(report) * 2)  # the batch is replicated over tensor
  assert report['argument_bytes'] == pytest.approx(promised, rel=0.01)
  assert 'all-reduce' in report['collectives']  # the row-parallel projections' sums


def test_two_slices_cross_only_with_the_gradient_reduction():
  report = tpu_plan.compile_train(small_config(data=2, fsdp=-1),
                             tpu.Slice.parse('v5e-4', num_slices=2), with_eval=False)
  assert report['chips'] == 8 and report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  across = report['dcn_collectives']
  # Only the gradients' reduction over `data` crosses slices, each chip's fsdp share of them.
  assert set(across) == {'all-reduce'} and across['all-reduce']['count'] >= 2 * 7
  assert across['all-reduce']['bytes'] == pytest.approx(report['num_params'] * 4 / 4, rel=0.01)
  assert 'dcn' in report['roofline_bounds_s']


def test_tpu_program_holds_no_xla_cpu_constructs():
  """Traced for TPU devices on this CPU host, the step is the plain program, without the
  layout constraints and barriers that gpt_jax/backends/cpu/products.py adds for XLA:CPU."""
  config = small_config(seq_len=128)
  texts = {}
  for name, devices in (('cpu', jax.devices()[:1]), ('tpu', tpu.Slice.parse('v5p-8').devices())):
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    steps = steps_lib.build(config, Transformer(ModelConfig.from_config(config.model)),
                            optim.make_optimizer(config.optim, 10),
                            optim.learning_rate_schedule(config.optim, 10), mesh, rules,
                            checkpoint.trainable_params(config, None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      assert target.platform() == name
      texts[name] = steps.train_step.lower(
          steps.abstract_state, steps.abstract_batch(8, 128),
          steps.abstract_frozen, steps.abstract_inputs).as_text()
  assert 'LayoutConstraint' in texts['cpu']  # the construct exists, on CPU
  assert 'LayoutConstraint' not in texts['tpu']
  assert 'optimization_barrier' not in texts['tpu']


def test_per_chip_memory_stays_flat_as_the_slice_grows():
  """Weak scaling: one sequence per chip, pure FSDP, 16 and 64 chips."""
  temps = {}
  for chips, name in ((16, 'v5p-32'), (64, 'v5p-128')):
    config = small_config(batch_size=chips, seq_len=2048)
    config.model.remat = 'full'
    report = tpu_plan.compile_train(config, tpu.Slice.parse(name), with_eval=False)
    temps[chips] = report['temp_bytes']
  assert temps[64] <= 1.1 * temps[16], temps


def test_mesh_that_does_not_fit_the_torus_is_one_clear_error():
  config = small_config(data=16, fsdp=32)
  with pytest.raises(ConfigError, match=r'cannot be laid on the 8x8x8 torus.*\[1, 8, 64, 512\]'):
    sharding.make_mesh(config.mesh, tpu.Slice.parse('v5p-1024').devices())


def test_a_batch_that_does_not_fit_is_one_line(tmp_path):
  config_file = tmp_path / 'big.py'
  config_file.write_text(
      'from gpt_jax.config import base_config\n'
      'def get_config():\n'
      '  c = base_config()\n'
      '  c.model.num_layers, c.model.emb_dim = 2, 256\n'
      '  c.model.num_heads, c.model.mlp_dim = 2, 1024\n'
      '  c.model.vocab_size, c.model.max_len, c.data.seq_len = 2048, 2048, 2048\n'
      '  c.data.batch_size = 4096\n'
      '  return c\n')
  result = subprocess.run([sys.executable, '-m', 'gpt_jax.aot', f'--config={config_file}',
                           '--topology=v5e-4', '--noeval'], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  lines = result.stdout.strip().splitlines()
  assert re.search(r'does not fit: .*exceeds', lines[-1]), result.stdout
  assert 'Traceback' not in result.stderr


def test_max_batch_is_the_largest_multiple_that_fits(monkeypatch):
  """The search over batches, with compilation replaced by a memory curve that is not linear
  (fixed costs, a quadratic term) and that refuses the largest batches outright, as libtpu
  does: it finds the exact bound in a few compilations."""
  capacity = tpu.CHIPS['v5e'].hbm_bytes
  tried = []

  def fake_compile(config, topology, with_eval=True):
    batch = config.data.batch_size
    tried.append(batch)
    hbm = 3e8 + 4.1e7 * batch + 2e4 * batch ** 2
    if hbm > 1.4 * capacity:  # the compiler's own refusal: no figure for the whole step
      return {'global_batch': batch, 'fits': False, 'hbm_bytes_per_chip': float('nan'),
              'hbm_capacity_bytes': capacity}
    return {'global_batch': batch, 'fits': hbm <= capacity, 'hbm_bytes_per_chip': hbm,
            'hbm_capacity_bytes': capacity}

  monkeypatch.setattr(tpu_plan, 'compile_train', fake_compile)
  batch, report = tpu_plan.max_batch(small_config(), tpu.Slice.parse('v5e-4'))
  fits = [b for b in range(4, 4000, 4) if 3e8 + 4.1e7 * b + 2e4 * b ** 2 <= capacity]
  assert batch == max(fits) and report['global_batch'] == batch
  assert len(tried) <= 10, tried


def test_decoding_compiles_for_one_chip_with_its_cache():
  config = small_config(seq_len=256)
  report = tpu_plan.compile_decode(config, tpu.Slice.parse('v5e-4'), batch=8, prompt_len=16,
                              max_new_tokens=64)
  assert report['fits']
  param_bytes = report['argument_bytes'] - 8 * 16 * 4 * 2  # the parameters, float32, on one chip
  cache_bytes = 2 * 2 * 8 * 2 * 128 * 128 * 2  # (k, v) x layers x rows x kv heads x slots x dim
  assert param_bytes > 0.9 * config.model.vocab_size * 256 * 4
  assert report['temp_bytes'] >= cache_bytes
  # A step reads every parameter at least once.
  assert report['step_hbm_bytes'] >= param_bytes
  with pytest.raises(ConfigError, match='exceeds model.max_len'):
    tpu_plan.compile_decode(config, tpu.Slice.parse('v5e-4'), 8, 200, 100)


def test_forward_mode_autodiff_runs_through_the_default_path():
  """jax.jvp through the model as compiled for a TPU: the plain products and GELU of
  gpt_jax.backends (the CPU forms, like the splash kernel, are custom VJPs: reverse mode only,
  so forward mode takes attention='xla')."""
  config = small_config(seq_len=128)
  config.model.compute_dtype = 'bfloat16'
  config.model.attention = 'xla'
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = sharding.make_mesh(config.mesh, tpu.Slice.parse('v5p-8').devices())
  rules = sharding.logical_rules(config.mesh)
  params = sharding.abstract_params(model, 128, mesh, rules)
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)

  def logits_and_tangent(params, tangents, tokens):
    return jax.jvp(lambda p: model.apply({'params': p}, tokens)[0], (params,), (tangents,))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(logits_and_tangent).lower(params, params, tokens).compile()
  assert compiled.as_text().count('convolution(') + compiled.as_text().count(' dot(') > 0
