"""Orbax checkpoints that describe themselves.

A workdir holds `config.json` (the resolved config), `tokenizer/` and `checkpoints/<step>/` with
the items `params`, `opt_state`, `data` (the training data iterator's position) and
`fingerprint` (checksums of the arrays, verified on restore). Sampling, evaluation and serving
read `params` alone and rebuild the model from `config.json`.

A LoRA fine-tuning workdir (`lora.rank > 0` in its config) saves only what it trains: the
adapters and the rows of the chat tokens. Its base is `init_from` at the recorded `init_step`;
`load_model` rebuilds the base, grows its vocabulary as the run did, and merges the adapters.
"""

import dataclasses
import json
import os
import re
import time

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gpt_jax import files, lora as lora_lib
from gpt_jax import config as config_lib
from gpt_jax import sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import PARAMETER_FIELDS, ModelConfig, Transformer, unstack_layers

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    with files.written_whole(os.path.join(workdir, CONFIG_FILE)) as f:
      f.write(config.to_json(indent=2))


def prepare_workdir(workdir: str, config, model_cfg: ModelConfig, start_over: bool) -> None:
  """Checks that the workdir's (and init_from's) checkpoints fit `model_cfg`, then saves config.

  With `start_over`, existing checkpoints are first moved aside, never deleted.
  """
  checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
  if start_over and jax.process_index() == 0 and os.path.isdir(checkpoints):
    aside = f'{checkpoints}.before_start_over.{int(time.time())}'
    os.replace(checkpoints, aside)
    logging.warning('--start_over: moved the old checkpoints to %s', aside)
  if os.path.isdir(checkpoints) and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    check_compatible(workdir, model_cfg)
  if config.init_from:
    check_compatible(config.init_from, model_cfg, vocab_may_grow=True)
  save_config(workdir, config)


def resolve_init_step(config, workdir: str) -> int:
  """The step of `config.init_from` this run starts from: `config.init_step` if set, else the
  one this workdir recorded (a resumed run keeps its base), else init_from's latest."""
  if config.init_step >= 0:
    return config.init_step
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = load_config(workdir)
    if saved.get('init_from') == config.init_from and saved.get('init_step', -1) >= 0:
      return saved.init_step
  manager = make_manager(config.init_from, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(config.init_from, CHECKPOINT_DIR)}'
                            ' (config.init_from)')
  return step


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a gpt_jax workdir written by '
                            'gpt_jax.train?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def check_compatible(workdir: str, model_cfg: ModelConfig, vocab_may_grow: bool = False) -> None:
  """The checkpoints in `workdir` hold parameters for `model_cfg`, or a ConfigError lists why not.

  With `vocab_may_grow`, `model_cfg` may have more vocabulary rows (fine-tuning adds tokens).
  """
  saved = ModelConfig.from_config(load_config(workdir).model)
  fields = [f for f in PARAMETER_FIELDS if getattr(saved, f) != getattr(model_cfg, f)
            and not (f == 'max_len' and saved.position == model_cfg.position == 'rope')
            and not (f == 'vocab_size' and vocab_may_grow
                     and saved.vocab_size < model_cfg.vocab_size)]
  if fields:
    diff = ', '.join(f'model.{f}={getattr(saved, f)!r} there, {getattr(model_cfg, f)!r} here'
                     for f in fields)
    raise ConfigError(f'The checkpoints in {workdir} were written for a different model: {diff}')


def make_manager(workdir: str, checkpoint_config=None, read_only: bool = False):
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  # A read-only manager makes Orbax warn twice that it is read only, which is what was asked.
  verbosity = logging.get_verbosity()
  if read_only:
    logging.set_verbosity(min(verbosity, logging.ERROR))
  try:
    if checkpoint_config is None:
      options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=checkpoint_config.keep,
          cleanup_tmp_directories=True,  # what a killed or failed save left behind
          enable_async_checkpointing=checkpoint_config.async_save,
          read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(directory, options=options)
  finally:
    logging.set_verbosity(verbosity)


def _checksum(x):
  if x.dtype.itemsize == 2:
    words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).ravel()
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


def checksum_on_host(x) -> np.ndarray:
  """_checksum in numpy (the same uint32 arithmetic, wrapping alike)."""
  x = np.ascontiguousarray(x)
  words = (x.view(np.uint16).astype(np.uint32) if x.dtype.itemsize == 2
           else x.view(np.uint32)).ravel()
  weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
  return np.array([words.sum(dtype=np.uint32), (words * weights).sum(dtype=np.uint32)])


_checksum_all = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def fingerprint(tree):
  """Two uint32 checksums per array (plain and position-weighted sums of its 32-bit words).

  Saved with every checkpoint and compared after restoring: storage that silently flips bits in
  array data (which the array format itself does not checksum) is caught. Computed on device,
  so it works for arrays sharded over many hosts: one program for the whole tree. On a single
  CPU device the arrays are in host memory already, and numpy needs no program at all: the
  tree's program took XLA:CPU 1.6 s to compile for the baby config, and a restart 0.3 s to
  load. (Small programs per array, dispatched back to back, hung a two-process CPU run and
  aborted an 8-device one: a collective stuck in XLA:CPU.)
  """
  devices = {d for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
             for d in x.sharding.device_set}
  if len(devices) <= 1 and all(d.platform == 'cpu' for d in devices):
    return jax.tree.map(checksum_on_host, tree)
  return _checksum_all(tree)


def _fingerprint_json(tree, checksums=None) -> dict[str, list[int]]:
  """`fingerprint(tree)` by array path; `checksums`: that fingerprint, computed already."""
  checksums = fingerprint(tree) if checksums is None else checksums
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(checksums))[0]
  return {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in flat}


class CorruptCheckpointError(ConfigError):
  """A checkpoint's files cannot be read or do not hold what was written."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, no permission); older ones are intact."""


def _write_reason(e: Exception) -> str:
  """'No space left on device', whether Python's file writes or tensorstore's failed."""
  error = e
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    error = error.__cause__ or error.__context__
  reason = str(e).strip().splitlines()[0].rsplit(': ', 1)[-1]
  return re.sub(r" \[os_error_code='?\d+'?\]$", '', reason)  # tensorstore's suffix


def _write_error(manager, e: Exception) -> CheckpointWriteError:
  reason = _write_reason(e)
  return CheckpointWriteError(
      f'Writing a checkpoint to {manager.directory} failed: {reason}. The newest complete '
      f'checkpoint is step {manager.latest_step()}.')


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Blocks until the pending save is committed; a failed write becomes CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # Orbax re-raises the writer thread's error, whatever its type.
    raise _write_error(manager, e) from e


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
  """Starts saving (asynchronously if configured); Orbax commits each step atomically."""
  items = {'params': ocp.args.StandardSave(state.params),
           'opt_state': ocp.args.StandardSave(state.opt_state),
           'fingerprint': ocp.args.JsonSave(_fingerprint_json(
               {'params': state.params, 'opt_state': state.opt_state}))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  try:
    manager.save(step, args=ocp.args.Composite(**items))
  except Exception as e:  # the previous save's failure surfaces here too
    raise _write_error(manager, e) from e


def save_params(workdir: str, step: int, params, bytes_in_flight: int | None = None,
                checksums=None) -> None:
  """Writes `checkpoints/<step>/` with parameters alone (e.g. converted weights), synchronously.

  For a converter to keep its peak memory near one copy of the parameters: bytes_in_flight, the
  most array bytes being written at once (by default Orbax's 96 GB; Orbax holds a host copy of
  each while it writes it); checksums, `fingerprint(params)` computed array by array on the host
  (checksum_on_host; over many devices, `fingerprint` computes the whole tree in one program).
  """
  if bytes_in_flight is None:
    manager = make_manager(workdir)
  else:
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(),
        item_handlers={'params': ocp.StandardCheckpointHandler(
            save_concurrent_gb=bytes_in_flight / 1e9),
                       'fingerprint': ocp.JsonCheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      fingerprint=ocp.args.JsonSave(_fingerprint_json(
          {'params': params}, None if checksums is None else {'params': checksums}))))
  wait_until_saved(manager)
  manager.close()


def _verify(manager, step: int, restored: dict, saved_fingerprint: dict) -> None:
  got = _fingerprint_json(restored)
  bad = sorted(k for k, v in saved_fingerprint.items() if k in got and got[k] != v)
  if bad:
    raise CorruptCheckpointError(
        f'{_step_dir(manager, step)}: {len(bad)} arrays differ from what was saved '
        f'(first: {bad[0]})')


def _step_dir(manager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _read(manager: ocp.CheckpointManager, step: int, items: dict) -> dict:
  """Restores `items` of a step with its fingerprint, and checks the arrays against it."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        **items, fingerprint=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable files.
    raise CorruptCheckpointError(f'{_step_dir(manager, step)} cannot be read: '
                                 f'{_first_line(e)}') from e
  arrays = {k: restored[k] for k in ('params', 'opt_state') if k in items}
  _verify(manager, step, arrays, restored['fingerprint'] or {})
  return restored


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores and verifies the train state into `abstract_state`'s shardings (and data position).

  The state reshards onto the current mesh, whatever mesh and process count wrote it. So does
  the data position: each process saves its own, but every process's is the count of global
  batches read (gpt_jax/data.py slices global batch s into the processes' shares), so a
  checkpoint from another process count gives every process that same position."""
  items = {'params': ocp.args.StandardRestore(abstract_state.params),
           'opt_state': ocp.args.StandardRestore(abstract_state.opt_state)}
  data_state = None
  if data_iterator is not None:
    data_state = _data_state_of_other_process_count(manager, step)
    if data_state is None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = _read(manager, step, items)
  if data_state is not None:
    data_iterator.set_state(data_state)
  step_array = jax.device_put(np.int32(step), abstract_state.step.sharding)
  return abstract_state.replace(step=step_array, params=restored['params'],
                                opt_state=restored['opt_state'])


def _data_state_of_other_process_count(manager, step: int) -> dict | None:
  """The data position saved by another number of processes than this run's; None when this
  process has its own file (or there is none at all, which the restore reports)."""
  folder = os.path.join(_step_dir(manager, step), 'data')
  if not os.path.isdir(folder) or os.path.exists(os.path.join(
      folder, f'process_{jax.process_index()}-of-{jax.process_count()}.json')):
    return None
  states = []
  for name in sorted(os.listdir(folder)):
    if re.fullmatch(r'process_\d+-of-\d+\.json', name):
      with open(os.path.join(folder, name), encoding='utf-8') as f:
        states.append(json.load(f))
  if not states:
    return None
  if any(state != states[0] for state in states):
    raise CorruptCheckpointError(f'{folder} holds different data positions for its processes: '
                                 f'{states}')
  return states[0]


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
  """(state, step) from the newest checkpoint that reads back intact, or (None, None) if none.

  An unreadable or corrupted checkpoint is moved to `<workdir>/corrupt_checkpoints/` with a
  warning, and the one before it is tried. If checkpoints exist but none can be read, that is
  an error: a run never silently starts over.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      return restore(manager, step, abstract_state, data_iterator), step
    except CorruptCheckpointError as e:
      logging.warning('%s; falling back to the previous checkpoint.', e)
      if jax.process_index() == 0:
        quarantine = os.path.join(os.path.dirname(str(manager.directory)), 'corrupt_checkpoints')
        os.makedirs(quarantine, exist_ok=True)
        os.replace(_step_dir(manager, step), os.path.join(quarantine, str(step)))
      manager.reload()
  if steps:
    raise CorruptCheckpointError(
        f'None of the checkpoints in {manager.directory} (steps {sorted(steps)}) can be read; '
        'they were moved to corrupt_checkpoints/. Run again with --start_over to train from '
        'step 0.')
  return None, None


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """The parameters alone (no optimizer state) of the latest (or given) checkpoint, verified."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist')
  manager = make_manager(workdir, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}')
  restored = _read(manager, step, {'params': ocp.args.StandardRestore(abstract_params)})
  manager.close()
  return restored['params'], step


def trainable_params(config, tokenizer) -> lora_lib.Trainable:
  """Which parameters a run with `config` and `tokenizer` trains (and its checkpoints hold)."""
  lora = config_lib.lora_config(config)
  token_ids = ()
  if lora.rank and config.lora.get('train_chat_tokens'):
    # gpt_jax's chat tokens, added for fine-tuning (a tokenizer's own are pretrained)
    token_ids = tokenizer_lib.chat_token_ids(tokenizer)
  return lora_lib.Trainable(lora, token_ids)


def _single_device(abstract_tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      abstract_tree)


def _abstract_params(model: Transformer, placement):
  """Parameters' abstract arrays: on `placement`'s mesh by their logical names, or on the first
  device."""
  if placement is None:
    return _single_device(nn.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))['params'])
  return sharding.abstract_params(model, 1, placement.mesh, placement.rules)


def _unstack_in_place(model_cfg: ModelConfig, params, placement):
  """unstack_layers, one stacked leaf at a time into each layer's own sharding, so that a
  sharded model never needs twice its memory on a device."""
  if placement is None or not model_cfg.scan_layers:
    return unstack_layers(model_cfg, params)
  params = dict(params)
  stacked, treedef = jax.tree.flatten(params.pop('blocks'))
  layers = [[] for _ in range(model_cfg.num_layers)]
  for i, leaf in enumerate(stacked):
    stacked[i] = None  # freed as soon as it is split
    each = jax.sharding.NamedSharding(leaf.sharding.mesh,
                                      jax.sharding.PartitionSpec(*leaf.sharding.spec[1:]))
    parts = jax.jit(lambda x: [x[n] for n in range(model_cfg.num_layers)],
                    out_shardings=each)(leaf)
    del leaf
    for n, part in enumerate(parts):
      layers[n].append(part)
  for n, leaves in enumerate(layers):
    params[f'block_{n}'] = jax.tree.unflatten(treedef, leaves)
  return dataclasses.replace(model_cfg, scan_layers=False, scan_unroll=1), params


def load_model(workdir: str, step: int | None = None, placement=None):
  """(ModelConfig, params, step) from a workdir; no optimizer state.

  The parameters go straight into the shardings `placement` (a sharding.Placement) gives them,
  never gathered on one device; without one, onto the first device. Scanned layers come back as
  per-layer parameters (and a config saying so), ready to decode. A LoRA workdir's adapters come
  back merged into its base's weights.

  The checkpoint may have been written by any number of devices and processes.
  """
  config = load_config(workdir)
  model_cfg = ModelConfig.from_config(config.model)
  if placement is not None:
    sharding.check_heads_fit(model_cfg.num_heads, model_cfg.kv_heads, placement)
  lora = config_lib.lora_config(config)
  if not lora.rank:
    params, step = restore_params(workdir, _abstract_params(Transformer(model_cfg), placement),
                                  step)
    model_cfg, params = _unstack_in_place(model_cfg, params, placement)
    return model_cfg, params, step

  trainable = trainable_params(config, tokenizer_lib.load(os.path.join(workdir, 'tokenizer')))
  # What the run trained: adapters and a few embedding rows, small enough to replicate.
  shapes = jax.eval_shape(lambda tree: trainable.split(tree)[0],
                          _abstract_params(Transformer(model_cfg, lora), None))
  where = (jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
           if placement else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  abstract_trained = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), shapes)
  trained, step = restore_params(workdir, abstract_trained, step)
  _, base, _ = load_model(config.init_from, config.init_step, placement)
  base = lora_lib.grow_vocab(base, model_cfg.vocab_size)
  model_cfg, trained = _unstack_in_place(model_cfg, trained, placement)
  params = lora_lib.merge(trainable.assemble(trained, base), lora)
  return model_cfg, params, step
