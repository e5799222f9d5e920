r"""Pretrain a GPT.

  python -m gpt_jax.train --config=configs/default.py --workdir=runs/default \
      [--config.train.num_steps=2000 --config.model.num_layers=6 ...]

Reads top to bottom: config, mesh, data, state, step, checkpoint, loop. A run is defined by its
config and workdir; running the same command again resumes from the latest checkpoint.
"""

import math
import os
import shutil
import signal
import sys
import time

from absl import app, flags, logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from gpt_jax import checkpoint, cli, data, decode, flops, optim, sharding
from gpt_jax import config as config_lib
from gpt_jax.metrics import MetricWriter
from gpt_jax.model import ModelConfig, Transformer, count_params, unstack_layers
from gpt_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and tokenizer.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in a multi-host run.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Call jax.distributed.initialize() (cluster auto-detection: Cloud TPU, SLURM, Open MPI). '
    'auto: when a multi-process SLURM or Open MPI job is detected, or --coordinator_address is '
    'given.')
_START_OVER = flags.DEFINE_bool(
    'start_over', False, 'Move existing checkpoints aside and train from step 0 (needed when '
    'none of them can be read).')


class TrainState(train_state.TrainState):
  """step, params and opt_state (apply_fn and tx are static)."""


def loss_fn(model: Transformer, params, batch, dropout_rng):
  """Mean next-token cross-entropy over the batch (weighted when batch has 'weights')."""
  logits, _ = model.apply({'params': params}, batch['inputs'],
                          deterministic=model.cfg.dropout == 0, rngs={'dropout': dropout_rng})
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  weights = batch.get('weights', jnp.ones_like(losses))
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def sharded_state(model: Transformer, tx, seq_len: int, mesh, rules):
  """(init_state(rng) -> TrainState, the abstract TrainState with each leaf's sharding).

  Shardings come from the parameters' logical names and the rules; a name without a rule, or a
  dimension that does not divide over its mesh axes, is an error here, before any compilation.
  """
  def boxed_state(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  boxed = jax.eval_shape(boxed_state, jax.random.key(0))
  logical_specs = nn.get_partition_spec(boxed)
  sharding.check_rules(logical_specs.params, rules)
  shardings = sharding.logical_to_shardings(logical_specs, mesh, rules)
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  sharding.check_divisible(abstract.params, shardings.params)
  return (lambda rng: nn.unbox(boxed_state(rng))), abstract


def make_train_step(model: Transformer, schedule, grad_accum_steps: int, seed: int):

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)  # randomness from (seed, step)
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(model, p, b, r))
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i takes rows i, i+k, i+2k, ... so that each one spans every data shard.
      micro = jax.tree.map(
          lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(grad_sum, inputs):
        i, micro_batch = inputs
        loss, grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, grad_sum, grads), loss

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, losses = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      loss = losses.mean()
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads=grads)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were, so no
    # NaN ever reaches a checkpoint; the loop halts or counts the skipped step.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=new_state.step))
    metrics = {'train_loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'nonfinite': jnp.logical_not(finite).astype(jnp.int32)}
    return new_state, metrics

  return train_step


def make_eval_step(model: Transformer):

  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return losses.sum(), losses.size

  return eval_step


def evaluate(eval_step, params, batches, to_global) -> float:
  total, count = 0.0, 0
  for batch in batches:
    loss_sum, n = eval_step(params, to_global(batch))
    total, count = total + float(loss_sum), count + int(n)
  return total / count


class StopRequest:
  """SIGTERM or SIGINT asks the loop to checkpoint and stop; a second SIGINT aborts at once."""

  def __init__(self):
    self.signal_name = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def train_and_evaluate(config, workdir: str, start_over: bool = False) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
  # ------------------------------------------------------------------ config
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if config.train.compilation_cache:
    # Persistent across restarts: a resumed or preempted run skips recompiling its steps.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  data_shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro_batch = config.data.batch_size // config.optim.grad_accum_steps
  if micro_batch % data_shards:
    raise ConfigError(f'The micro-batch of {micro_batch} sequences (data.batch_size / '
                     f'optim.grad_accum_steps) does not divide over data x fsdp = {data_shards} '
                     'devices')
  logging.info('Mesh %s on %d devices, %d processes', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ------------------------------------------------------------------ data
  # Process 0 builds the dataset, tokenizer and token cache; the others then read them.
  own_tokenizer, init_tokenizer = (os.path.join(d, 'tokenizer') for d in (workdir,
                                                                         config.init_from))
  if is_main and config.init_from and not os.path.isdir(own_tokenizer):
    shutil.copytree(init_tokenizer, own_tokenizer)  # fine-tuning keeps the model's vocabulary
  if is_main:
    tokenizer = data.prepare_tokenizer(config, workdir)
  multihost_utils.sync_global_devices('tokenizer ready')
  if not is_main:
    tokenizer = data.prepare_tokenizer(config, workdir)
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer.vocab_size
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'config.model.vocab_size ({config.model.vocab_size}) is smaller than the '
                     f"tokenizer's vocabulary ({tokenizer.vocab_size})")
  model_cfg = ModelConfig.from_config(config.model)
  checkpoint.prepare_workdir(workdir, config, model_cfg, start_over)
  for split, needed in ((config.data.train_split, True), (config.data.val_split,
                                                         bool(config.train.eval_every))):
    if needed and is_main:
      data.token_stream(config.data, tokenizer, workdir, split)
  multihost_utils.sync_global_devices('token streams ready')
  train_iter = data.make_train_iterator(config, tokenizer, workdir)
  eval_batches = (data.make_eval_batches(config, tokenizer, workdir, config.train.eval_batches)
                  if config.train.eval_every else [])
  batch_sharding = sharding.batch_sharding(mesh, rules)

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local_batch.items()}

  # ------------------------------------------------------------------ state
  model = Transformer(model_cfg)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)

  init_state, abstract_state = sharded_state(model, tx, config.data.seq_len, mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  rng = jax.random.key(config.seed)

  # ------------------------------------------------------------------ checkpoint (resume)
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, start_step = checkpoint.restore_latest(manager, abstract_state, train_iter)
    if state is None:
      start_step = 0
      state = jax.jit(init_state, out_shardings=state_shardings)(rng)
      if config.init_from:  # fine-tuning: parameters from another run, a fresh optimizer
        params, init_step = checkpoint.restore_params(config.init_from, abstract_state.params)
        logging.warning('Initialised parameters from %s (step %d)', config.init_from, init_step)
        state = state.replace(params=params)
    else:
      logging.warning('Resuming from step %d in %s', start_step, workdir)

  writer = MetricWriter(workdir, resume_step=start_step)
  if eval_batches:
    # A reference the model must beat: the entropy of the validation tokens' own frequencies.
    counts = np.bincount(np.concatenate([b['targets'].ravel() for b in eval_batches]))
    probs = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(probs * np.log(probs)).sum())
    if is_main and start_step == 0:
      writer.write(0, {'val_unigram_entropy': unigram_entropy})
  num_params = count_params(state.params)
  flops_per_token = flops.train_flops_per_token(model_cfg, config.data.seq_len)
  peak = flops.measure_matmul_peak(model_cfg.compute_dtype) if config.train.measure_peak else 0.0
  if is_main:
    print(f'{num_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, '
          f'{flops_per_token / 1e6:.1f} MFLOP/token'
          + (f', matmul peak {peak / 1e9:.0f} GFLOP/s per device' if peak else ''), flush=True)

  # ------------------------------------------------------------------ step
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(
        make_train_step(model, schedule, config.optim.grad_accum_steps, config.seed),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)  # the old state's buffers are reused for the new one
    eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings.params,
                                                             batch_sharding))

  # ------------------------------------------------------------------ loop
  tokens_per_step = config.data.batch_size * config.data.seq_len
  num_steps = config.train.num_steps
  progress = tqdm.tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not (is_main and config.train.progress_bar))
  last = {}
  timer_step, timer_start = start_step, time.perf_counter()
  step = saved_step = start_step
  skipped, first_skipped = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # on device
  stop = StopRequest()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = train_step(state, to_global(next(train_iter)))
        # Counted on device: no host round trip per step.
        first_skipped = jnp.where((first_skipped == 0) & (metrics['nonfinite'] > 0), step,
                                  first_skipped)
        skipped = skipped + metrics.pop('nonfinite')
        progress.update()

        if step % config.train.log_every == 0 or step == num_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          metrics['skipped_steps'] = int(skipped)
          if metrics['skipped_steps'] and config.train.on_nonfinite == 'halt':
            raise FloatingPointError(
                f'Non-finite loss or gradient at step {int(first_skipped)} (and '
                f'{metrics["skipped_steps"] - 1} later steps); their updates were not applied. '
                f'The last checkpoint is step {saved_step}. Lower optim.lr, raise '
                'optim.warmup_steps, or set train.on_nonfinite=skip.')
          elapsed = time.perf_counter() - timer_start
          tokens_per_s = (step - timer_step) * tokens_per_step / elapsed
          metrics['tokens_per_s'] = tokens_per_s
          if peak:
            metrics['mfu'] = tokens_per_s * flops_per_token / (peak * jax.device_count())
          writer.write(step, metrics)
          progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f'{tokens_per_s:,.0f}')
          last.update(metrics)
          timer_step, timer_start = step, time.perf_counter()

        if config.train.eval_every and (step % config.train.eval_every == 0 or step == num_steps):
          val_loss = evaluate(eval_step, state.params, eval_batches, to_global)
          writer.write(step, {'val_loss': val_loss,
                              'val_perplexity': math.exp(min(val_loss, 50))})
          progress.write(f'step {step}: val_loss {val_loss:.4f}') if is_main else None
          last['val_loss'] = val_loss
          timer_start = time.perf_counter()  # keep evaluation out of tokens/s

        stopping = stop.signal_name or manager.reached_preemption(step)
        if step % config.checkpoint.every_steps == 0 or step == num_steps or stopping:
          checkpoint.save(manager, step, state, train_iter)
          saved_step = step
        if stopping:
          break
    checkpoint.wait_until_saved(manager)
  finally:
    stop.restore()
    manager.close()
    progress.close()
    writer.close()
  if stop.signal_name or step < num_steps:
    reason = stop.signal_name or 'a preemption notice'
    if is_main:
      print(f'Stopped at step {step} on {reason}; checkpoint saved in {workdir}. Run the same '
            'command to resume.', flush=True)
    return last

  # ------------------------------------------------------------------ sample
  if config.train.sample_tokens:
    # Every process takes part in gathering the sharded parameters; process 0 samples.
    params = multihost_utils.process_allgather(state.params, tiled=True)
  if config.train.sample_tokens and is_main:
    generator = decode.Generator(*unstack_layers(model_cfg, params))
    prompt = decode.encode_prompt(tokenizer, config.train.sample_prompt)
    new_tokens = config.train.sample_tokens
    new_tokens = min(new_tokens, model_cfg.max_len - len(prompt))
    (completion,) = generator.generate([prompt], new_tokens, temperature=0.8, top_k=50,
                                       eos_id=tokenizer.eos_id, seed=config.seed)
    print('--- sample ---\n' + tokenizer.decode(prompt + completion) + '\n---', flush=True)
  return last


def _multiprocess_job() -> bool:
  return any(int(os.environ.get(var, '1')) > 1 for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  cli.quiet_logs()
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value == 'on' or (_DISTRIBUTED.value == 'auto' and _multiprocess_job()):
    jax.distributed.initialize()  # jax detects the coordinator, process count and id
  try:
    with cli.one_line_errors(FloatingPointError):
      train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
  except checkpoint.CheckpointWriteError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    # Skip interpreter teardown: Orbax's failed writer threads would print tracebacks after it.
    os._exit(1)


if __name__ == '__main__':
  app.run(main)
