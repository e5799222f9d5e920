"""Orbax checkpoints that describe themselves.

A workdir holds `config.json` (the resolved config), `tokenizer/` and `checkpoints/<step>/` with
three items: `params`, `opt_state` and `data` (the training data iterator's position). Sampling,
evaluation and serving read `params` alone and rebuild the model from `config.json`.
"""

import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from gpt_jax.model import ModelConfig, Transformer

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))  # atomic: never a half-written config


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a gpt_jax workdir written by '
                            'gpt_jax.train?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def make_manager(workdir: str, checkpoint_config=None, read_only: bool = False):
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if checkpoint_config is None:
    options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only)
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        enable_async_checkpointing=checkpoint_config.async_save,
        read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
  """Starts saving (asynchronously if configured); Orbax commits each step atomically."""
  items = {'params': ocp.args.StandardSave(state.params),
           'opt_state': ocp.args.StandardSave(state.opt_state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores the train state into `abstract_state`'s shardings (and the data position)."""
  items = {'params': ocp.args.StandardRestore(abstract_state.params),
           'opt_state': ocp.args.StandardRestore(abstract_state.opt_state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  step_array = jax.device_put(step, abstract_state.step.sharding)
  return abstract_state.replace(step=step_array, params=restored['params'],
                                opt_state=restored['opt_state'])


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """The parameters alone (no optimizer state) of the latest (or given) checkpoint."""
  manager = make_manager(workdir, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}')
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  manager.close()
  return restored['params'], step


def load_model(workdir: str, step: int | None = None):
  """(ModelConfig, params on the first device, step) from a workdir; no optimizer state.

  The checkpoint may have been written by any number of devices and processes.
  """
  model_cfg = ModelConfig.from_config(load_config(workdir).model)
  abstract = nn.unbox(jax.eval_shape(
      lambda: Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract['params'])
  params, step = restore_params(workdir, abstract_params, step)
  return model_cfg, params, step
