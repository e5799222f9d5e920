r"""Pretrain a GPT, or continue training one.

  python -m gpt_jax.train --config=configs/default.py --workdir=runs/default \
      [--config.train.num_steps=2000 --config.model.num_layers=6 ...]

Reads top to bottom: config, mesh, data, state, checkpoint, loop, sample. A run is defined by its
config and workdir; running the same command again resumes from the latest checkpoint. With
`init_from` set (configs/finetune.py:DIR) the run starts from another workdir's parameters at
`init_step`, with its tokenizer.

What a run starts from, trains and reads is its `Pretraining` recipe: chat fine-tuning
(gpt_jax/sft/finetuning.py) and distillation (gpt_jax/compress/distillation.py) replace parts of
it, and the loop stays the same.
"""

import math
import os
import shutil
import signal
import sys
import time

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import tqdm

from gpt_jax import checkpoint, cli, data, decode, flops, liveness, optim, sharding, streaming
from gpt_jax import config as config_lib
from gpt_jax import lora as lora_lib
from gpt_jax import steps as steps_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.metrics import MetricWriter, MetricsWriteError
from gpt_jax.model import ModelConfig, Transformer, count_params, unstack_layers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags of every training binary (train, finetune, distill)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and tokenizer.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-host runs.')
  flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
  flags.DEFINE_integer('process_id', None, 'This process, in a multi-host run.')
  flags.DEFINE_enum(
      'distributed', 'auto', ['auto', 'on', 'off'],
      'Call jax.distributed.initialize() (cluster auto-detection: Cloud TPU, SLURM, Open MPI). '
      'auto: when a multi-process SLURM or Open MPI job is detected, or --coordinator_address '
      'is given.')
  flags.DEFINE_integer(
      'heartbeat_timeout', 60, 'Multi-process runs: seconds without a heartbeat after which a '
      'process counts as lost and the others stop, naming it (gpt_jax/liveness.py).')
  flags.DEFINE_bool(
      'start_over', False, 'Move existing checkpoints aside and train from step 0 (needed when '
      'none of them can be read).')


class Pretraining:
  """A run's recipe: its tokenizer, vocabulary, batches, objective and end-of-run sample.
  Pretraining builds the tokenizer from the corpus (or takes init_from's), reads config.data's
  corpus and minimises next-token cross-entropy."""

  def __init__(self, objective: steps_lib.Objective = steps_lib.CROSS_ENTROPY):
    self.objective = objective  # what the step minimises (gpt_jax.distill passes a teacher's)

  def prepare_tokenizer(self, config, workdir: str) -> tokenizer_lib.Tokenizer:
    own = os.path.join(workdir, 'tokenizer')
    if config.init_from and not os.path.isdir(own):
      shutil.copytree(os.path.join(config.init_from, 'tokenizer'), own)
    return data.prepare_tokenizer(config, workdir)

  def vocab_size(self, config, tokenizer, is_main: bool) -> int:
    """The model's embedding rows: the config's, else the tokenizer's."""
    if config.model.vocab_size == 0:
      return tokenizer.vocab_size
    if config.model.vocab_size < tokenizer.vocab_size:
      raise ConfigError(f'config.model.vocab_size ({config.model.vocab_size}) is smaller than '
                        f"the tokenizer's vocabulary ({tokenizer.vocab_size})")
    return config.model.vocab_size

  def batches(self, config, tokenizer, workdir: str, is_main: bool):
    """(the train iterator, the evaluation batches); process 0 prepares what all read."""
    if config.data.chat_files:
      raise ConfigError('config.data.chat_files holds conversations: fine-tune on them with '
                        'python -m gpt_jax.finetune')
    num_eval = config.train.eval_batches if config.train.eval_every else 0
    if data.use_streaming(config.data):
      # Every process reads, tokenizes and packs its own documents (gpt_jax/streaming.py).
      if is_main:
        streaming.prepare(config.data, config.data.train_split)
      multihost_utils.sync_global_devices('dataset ready')
      return (streaming.make_train_iterator(config, tokenizer),
              streaming.make_eval_batches(config, tokenizer, num_eval) if num_eval else [])
    for split, needed in ((config.data.train_split, True), (config.data.val_split, num_eval)):
      if needed and is_main:
        data.token_stream(config.data, tokenizer, workdir, split)
    multihost_utils.sync_global_devices('token streams ready')
    return (data.make_train_iterator(config, tokenizer, workdir),
            data.make_eval_batches(config, tokenizer, workdir, num_eval) if num_eval else [])

  def sample_prompt(self, tokenizer, text: str) -> tuple[list[int], int]:
    """(the end-of-run sample's prompt ids, the token that ends the sample)."""
    return decode.encode_prompt(tokenizer, text), tokenizer.eos_id


def set_up_compilation_cache(config, workdir: str) -> None:
  if config.train.compilation_cache:
    # Persistent across restarts: a resumed or preempted run skips recompiling its steps. A
    # directory set in JAX_COMPILATION_CACHE_DIR (e.g. one for all runs of a sweep) is kept.
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  else:
    jax.config.update('jax_enable_compilation_cache', False)


def load_base_params(config, mesh, rules):
  """init_from's parameters at init_step, sharded by the rules (a LoRA base comes merged)."""
  base_config = checkpoint.load_config(config.init_from)
  base_cfg = ModelConfig.from_config(base_config.model)
  abstract = sharding.abstract_params(Transformer(base_cfg), config.data.seq_len, mesh, rules)
  if config_lib.lora_config(base_config).rank:
    if base_cfg.scan_layers:
      raise ConfigError(f'{config.init_from} is a LoRA workdir with scanned layers: merge it '
                        'first (python -m gpt_jax.convert.merge_lora)')
    _, params, _ = checkpoint.load_model(config.init_from, config.init_step)
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract))
  params, _ = checkpoint.restore_params(config.init_from, abstract, config.init_step)
  return params


@jax.jit
def count_skipped(skipped, first_skipped, nonfinite, step):
  """(steps skipped so far, the first of them or 0), counted on device: no host round trip per
  step, and one small program rather than one per operation."""
  first_skipped = jnp.where((first_skipped == 0) & (nonfinite > 0), step, first_skipped)
  return skipped + nonfinite, first_skipped


def evaluate(eval_step, params, frozen, batches, to_global) -> float:
  """The mean loss over the batches' (weighted) target tokens."""
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, n = eval_step(params, to_global(batch), frozen)
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1)


def unigram_entropy(batches) -> float:
  """A reference the model must beat: the entropy of the target tokens' own frequencies."""
  counts = np.bincount(np.concatenate([
      b['targets'][b['weights'] > 0] if 'weights' in b else b['targets'].ravel()
      for b in batches]))
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())


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


def start_from_base(config, state, steps, trainable, start_step: int, mesh, rules):
  """(state, frozen) with init_from's weights under this run's adapters. Only what is trained is
  saved, so a resumed LoRA run takes its frozen base from init_from again."""
  vocab_size = config.model.vocab_size

  def combine(trained, base):
    params = lora_lib.combine(lora_lib.grow_vocab(base, vocab_size), lora_lib.split(trained)[1])
    return trainable.split(params)

  trained, frozen = jax.jit(combine, out_shardings=(
      steps.state_shardings.params, steps.frozen_shardings))(
          state.params, load_base_params(config, mesh, rules))
  if start_step == 0:
    state = state.replace(params=trained)
    logging.warning('Initialised parameters from %s (step %d)', config.init_from,
                    config.init_step)
  return state, frozen


def describe(state, frozen, lora, mesh, flops_per_token: float, peak: float) -> str:
  trained = ('' if not frozen else
             f' ({count_params(state.params) / 1e6:.3f}M trained: LoRA rank {lora.rank})')
  return (f'{(count_params(state.params) + count_params(frozen)) / 1e6:.2f}M parameters'
          f'{trained}, mesh {dict(mesh.shape)}, {flops_per_token / 1e6:.1f} MFLOP/token'
          + (f', matmul peak {peak / 1e9:.0f} GFLOP/s per device' if peak else ''))


def train_and_evaluate(config, workdir: str, recipe: Pretraining | None = None,
                       start_over: bool = False) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir` by `recipe` (default: Pretraining); returns the
  last logged metrics."""
  # ------------------------------------------------------------------ config
  recipe = recipe or Pretraining()
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  set_up_compilation_cache(config, workdir)

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  steps_lib.check_batch_fits_mesh(config, mesh)
  logging.info('Mesh %s on %d devices, %d processes', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ------------------------------------------------------------------ data
  # Process 0 builds the tokenizer and token cache; the others then read them.
  if config.init_from:
    config.init_step = checkpoint.resolve_init_step(config, workdir)
  if is_main:
    tokenizer = recipe.prepare_tokenizer(config, workdir)
  multihost_utils.sync_global_devices('tokenizer ready')
  if not is_main:
    tokenizer = recipe.prepare_tokenizer(config, workdir)
  config.model.vocab_size = recipe.vocab_size(config, tokenizer, is_main)
  model_cfg = ModelConfig.from_config(config.model)
  checkpoint.prepare_workdir(workdir, config, model_cfg, start_over)
  train_iter, eval_batches = recipe.batches(config, tokenizer, workdir, is_main)

  # ------------------------------------------------------------------ state
  # The state holds `trainable`'s share of the parameters; `frozen` rides beside it, unsaved.
  lora = config_lib.lora_config(config)
  model = Transformer(model_cfg, lora)
  trainable = checkpoint.trainable_params(config, tokenizer)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  steps = steps_lib.build(config, model, tx, schedule, mesh, rules, trainable, recipe.objective)

  # ------------------------------------------------------------------ checkpoint (resume)
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, start_step = checkpoint.restore_latest(manager, steps.abstract_state, train_iter)
    if state is None:
      start_step, rng = 0, jax.random.key(config.seed)
      state, frozen = steps_lib.compile_once_run(jax.jit(
          steps.init_state, out_shardings=(steps.state_shardings, steps.frozen_shardings)),
          rng)(rng)
    else:
      logging.warning('Resuming from step %d in %s', start_step, workdir)
      frozen = {}  # not in the checkpoints: a LoRA run reads its base again below
    if config.init_from and (start_step == 0 or steps.abstract_frozen):
      state, frozen = start_from_base(config, state, steps, trainable, start_step, mesh, rules)
    objective_inputs = recipe.objective.load_inputs(steps.abstract_inputs)  # never saved

  writer = MetricWriter(workdir, resume_step=start_step, tensorboard=config.train.tensorboard)
  if eval_batches and is_main and start_step == 0:
    writer.write(0, {'val_unigram_entropy': unigram_entropy(eval_batches)})
  flops_per_token = flops.train_flops_per_token(model_cfg, config.data.seq_len)
  peak = (flops.measure_matmul_peak(model_cfg.compute_dtype, mesh.local_devices[0])
          if config.train.measure_peak else 0.0)
  if is_main:
    print(describe(state, frozen, lora, mesh, flops_per_token, peak), flush=True)

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(steps.batch_sharding, v)
            for k, v in local_batch.items()}

  # ------------------------------------------------------------------ loop
  num_steps = config.train.num_steps
  progress = tqdm.tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not (is_main and config.train.progress_bar))
  last = {}
  timer_step, timer_start = start_step, time.perf_counter()
  step = saved_step = start_step
  # Placed as count_skipped returns them, so it compiles once.
  skipped, first_skipped = jax.device_put((np.int32(0), np.int32(0)),
                                          jax.sharding.NamedSharding(mesh, jax.P()))
  stop = StopRequest()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = steps.train_step(state, to_global(next(train_iter)), frozen,
                                          objective_inputs)
        skipped, first_skipped = count_skipped(skipped, first_skipped, metrics.pop('nonfinite'),
                                               step)
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
          tokens_per_s = ((step - timer_step) * config.data.batch_size * config.data.seq_len
                          / (time.perf_counter() - timer_start))
          metrics['tokens_per_s'] = tokens_per_s
          if peak:
            metrics['mfu'] = tokens_per_s * flops_per_token / (peak * jax.device_count())
          writer.write(step, metrics)
          progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f'{tokens_per_s:,.0f}')
          last.update(metrics)
          timer_step, timer_start = step, time.perf_counter()

        if config.train.eval_every and (step % config.train.eval_every == 0 or step == num_steps):
          val_loss = evaluate(steps.eval_step, state.params, frozen, eval_batches, to_global)
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
    # Closing the data iterator stops its worker processes, if any.
    close_all(stop.restore, train_iter.close, manager.close, progress.close, writer.close)
  if stop.signal_name or step < num_steps:
    if is_main:
      print(f'Stopped at step {step} on {stop.signal_name or "a preemption notice"}; checkpoint '
            f'saved in {workdir}. Run the same command to resume.', flush=True)
    return last

  # ------------------------------------------------------------------ sample
  if config.train.sample_tokens:
    # Every process takes part in gathering the sharded parameters; process 0 samples.
    params = multihost_utils.process_allgather(trainable.assemble(state.params, frozen),
                                               tiled=True)
  if config.train.sample_tokens and is_main:
    generator = decode.Generator(*unstack_layers(model_cfg, lora_lib.merge(params, lora)),
                                 num_tokens=tokenizer.vocab_size)
    prompt, eos_id = recipe.sample_prompt(tokenizer, config.train.sample_prompt)
    new_tokens = min(config.train.sample_tokens, model_cfg.max_len - len(prompt))
    (completion,) = generator.generate([prompt], new_tokens, temperature=0.8, top_k=50,
                                       eos_id=eos_id, seed=config.seed)
    print('--- sample ---\n' + tokenizer.decode(prompt + completion) + '\n---', flush=True)
  return last


def _multiprocess_job() -> bool:
  return any(int(os.environ.get(var, '1')) > 1 for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def close_all(*closers) -> None:
  """Runs every closer. While an error propagates, a closer's own failure (often the same full
  disk) is logged rather than raised, so that the first error is the one reported."""
  in_flight = sys.exc_info()[1]
  first_error = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if in_flight is not None:
        logging.warning('While stopping after an error, %s failed too: %s', close.__qualname__, e)
      first_error = first_error or e
  if in_flight is None and first_error is not None:
    raise first_error


def run(configure=None, make_recipe=None) -> None:
  """What the training binaries run, from the flags: `configure(config)` fills in the config
  first (gpt_jax.finetune, gpt_jax.distill), `make_recipe(config)` gives the run's recipe."""
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  cli.keep_freed_host_memory()
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors():  # the coordinator's port in use
    if FLAGS.coordinator_address:
      liveness.initialize(FLAGS.heartbeat_timeout, FLAGS.coordinator_address,
                          FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed == 'on' or (FLAGS.distributed == 'auto' and _multiprocess_job()):
      liveness.initialize(FLAGS.heartbeat_timeout)  # detects the coordinator, count and id
  liveness.watch(FLAGS.heartbeat_timeout)  # multi-process: a lost process stops the others
  try:
    with cli.one_line_errors(FloatingPointError):
      if configure is not None:
        configure(FLAGS.config)
      recipe = make_recipe(FLAGS.config) if make_recipe else Pretraining()
      train_and_evaluate(FLAGS.config, FLAGS.workdir, recipe, start_over=FLAGS.start_over)
  except jax.errors.JaxRuntimeError:
    liveness.wait_for_lost_process()  # a collective failing because a process died: name it
    raise
  except (checkpoint.CheckpointWriteError, MetricsWriteError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    # Skip interpreter teardown: Orbax's failed writer threads would print tracebacks after it.
    os._exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run()


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
