"""Structured pruning: remove whole attention heads and MLP units, write a smaller dense model
(`python -m gpt_jax.prune` runs it).

Every layer keeps its `heads_per_layer` most important query heads and `mlp_dim` most important
MLP units; the rest are cut out of the kernels, so the model is smaller, not sparse. With
grouped-query attention a key/value head and the query heads that read it go or stay together
(heads_per_layer is then a multiple of the group size). Head width is unchanged: the new
config.json says so with an explicit `model.head_dim`.

Importance is the size of what a head or unit adds to the residual stream:
  magnitude   ||its input weights|| x ||its output weights|| (Frobenius norms)
  activation  the mean norm of its output-projection term, ||y_h W_out[h]|| for a head and
              |h_j| ||W_fc_out[j]|| for a unit, over --batches validation batches
A removed head or unit therefore contributes exactly what it would if its output weights were
zero. Kept heads and units stay in their original order, so keeping everything changes nothing.

The output is a plain workdir (config.json, tokenizer/, checkpoints/<step>/ with parameters
only): sample, eval, serve, export, convert and fine-tuning (configs/finetune.py:OUT) load it.
"""

import dataclasses
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import checkpoint, data
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

CRITERIA = ('magnitude', 'activation')


def group_size(cfg: ModelConfig) -> int:
  """Query heads per key/value head: the unit in which heads are pruned."""
  return cfg.num_heads // cfg.kv_heads


def _norms(x, axes) -> np.ndarray:
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float32)), axis=axes))


def magnitude_scores(cfg: ModelConfig, params) -> tuple[np.ndarray, np.ndarray]:
  """(head scores [layers, num_heads], unit scores [layers, mlp_dim]) from the weights."""
  heads, units = [], []
  g = group_size(cfg)
  for i in range(cfg.num_layers):
    attn, mlp = params[f'block_{i}']['attn'], params[f'block_{i}']['mlp']
    # A query head's input weights include its share of the key/value head it reads.
    kv_in = np.repeat(_norms(attn['key']['kernel'], (0, 2)) ** 2
                      + _norms(attn['value']['kernel'], (0, 2)) ** 2, g) / g
    q_in = np.sqrt(_norms(attn['query']['kernel'], (0, 2)) ** 2 + kv_in)
    heads.append(q_in * _norms(attn['out']['kernel'], (1, 2)))
    unit_in = _norms(mlp['fc_in']['kernel'], 0) ** 2
    if 'fc_gate' in mlp:
      unit_in = unit_in + _norms(mlp['fc_gate']['kernel'], 0) ** 2
    units.append(np.sqrt(unit_in) * _norms(mlp['fc_out']['kernel'], 1))
  return np.stack(heads), np.stack(units)


def activation_scores(cfg: ModelConfig, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """(head scores [layers, num_heads], unit scores [layers, mlp_dim]): the mean norm of each
  head's and unit's term in its output projection over the batches' tokens."""
  model = Transformer(cfg)

  @jax.jit
  def batch_scores(params, tokens):
    seen = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == '__call__' and module.name in ('out', 'fc_out'):
        seen[(module.scope.path[0], module.name)] = args[0]  # ('block_i', projection)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply({'params': params}, tokens)
    heads, units = [], []
    for i in range(cfg.num_layers):
      block = params[f'block_{i}']
      y = seen[(f'block_{i}', 'out')].astype(jnp.float32)  # [b, t, heads, head_dim]
      terms = jnp.einsum('bthd,hde->bthe', y, block['attn']['out']['kernel'].astype(jnp.float32))
      heads.append(jnp.linalg.norm(terms, axis=-1).mean(axis=(0, 1)))
      h = seen[(f'block_{i}', 'fc_out')].astype(jnp.float32)  # [b, t, mlp]
      out_norms = jnp.linalg.norm(block['mlp']['fc_out']['kernel'].astype(jnp.float32), axis=1)
      units.append(jnp.abs(h).mean(axis=(0, 1)) * out_norms)
    return jnp.stack(heads), jnp.stack(units)

  totals = None
  for batch in batches:
    scores = batch_scores(params, jnp.asarray(batch['inputs']))
    totals = scores if totals is None else jax.tree.map(jnp.add, totals, scores)
  if totals is None:
    raise ConfigError('--criterion=activation needs at least one validation batch (--batches)')
  return tuple(np.asarray(s) / len(batches) for s in totals)


def select(head_scores: np.ndarray, unit_scores: np.ndarray, cfg: ModelConfig,
           heads_per_layer: int, mlp_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept query heads [layers, heads_per_layer], kept units [layers, mlp_dim]), each row the
  top-scoring ones in ascending order; heads go by whole key/value groups."""
  g = group_size(cfg)
  group_scores = head_scores.reshape(cfg.num_layers, cfg.kv_heads, g).sum(-1)
  # A stable sort: among equal scores the earlier head or unit stays.
  groups = np.sort(np.argsort(-group_scores, axis=1, kind='stable')[:, :heads_per_layer // g], 1)
  heads = (groups[:, :, None] * g + np.arange(g)).reshape(cfg.num_layers, -1)
  units = np.sort(np.argsort(-unit_scores, axis=1, kind='stable')[:, :mlp_dim], axis=1)
  return heads, units


def pruned_config(cfg: ModelConfig, heads_per_layer: int, mlp_dim: int) -> ModelConfig:
  kv_heads = heads_per_layer // group_size(cfg)
  return dataclasses.replace(
      cfg, num_heads=heads_per_layer, mlp_dim=mlp_dim, head_dim=cfg.head_dim,
      num_kv_heads=0 if cfg.num_kv_heads in (0, cfg.num_heads) else kv_heads)


def prune_params(cfg: ModelConfig, params, heads: np.ndarray, units: np.ndarray) -> dict:
  """Per-layer parameters with only the query heads `heads` [layers, k] (and their key/value
  heads) and the MLP units `units` [layers, m]."""
  g = group_size(cfg)
  params = dict(params)
  for i in range(cfg.num_layers):
    block = params[f'block_{i}']
    q, kv, u = heads[i], heads[i][::g] // g, units[i]
    take = lambda leaf, index, axis: jnp.take(leaf, jnp.asarray(index), axis=axis)
    attn = dict(block['attn'])
    for name, index in (('query', q), ('key', kv), ('value', kv)):
      attn[name] = {k: take(v, index, 1 if k == 'kernel' else 0) for k, v in attn[name].items()}
    attn['out'] = dict(attn['out'], kernel=take(attn['out']['kernel'], q, 0))
    mlp = dict(block['mlp'])
    for name in ('fc_in', 'fc_gate'):
      if name in mlp:
        mlp[name] = {k: take(v, u, 1 if k == 'kernel' else 0) for k, v in mlp[name].items()}
    mlp['fc_out'] = dict(mlp['fc_out'], kernel=take(mlp['fc_out']['kernel'], u, 0))
    params[f'block_{i}'] = dict(block, attn=attn, mlp=mlp)
  return params


def check_targets(cfg: ModelConfig, heads_per_layer: int, mlp_dim: int) -> None:
  g = group_size(cfg)
  if not 0 < heads_per_layer <= cfg.num_heads or heads_per_layer % g:
    groups = f' and a multiple of {g} (query heads per key/value head)' if g > 1 else ''
    raise ConfigError(f'--heads_per_layer must be in [1, {cfg.num_heads}]{groups}, got '
                      f'{heads_per_layer}')
  if not 0 < mlp_dim <= cfg.mlp_dim:
    raise ConfigError(f'--mlp_dim must be in [1, {cfg.mlp_dim}], got {mlp_dim}')


def _stack_layers(num_layers: int, params) -> dict:
  """Per-layer 'block_i' -> scanned 'blocks' with a leading layer axis."""
  params = dict(params)
  layers = [params.pop(f'block_{i}') for i in range(num_layers)]
  params['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def prune_workdir(workdir: str, out: str, heads_per_layer: int = 0, mlp_dim: int = 0,
                  criterion: str = 'magnitude', num_batches: int = 4,
                  step: int | None = None) -> dict:
  """Writes the pruned model to `out`; returns a summary (parameter counts, what was kept)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir} is not a directory')
  if criterion not in CRITERIA:
    raise ConfigError(f'--criterion must be one of {CRITERIA}, got {criterion!r}')
  config = checkpoint.load_config(workdir)
  scanned = bool(config.model.get('scan_layers'))
  cfg, params, step = checkpoint.load_model(workdir, step)  # per layer; LoRA merged
  heads_per_layer = heads_per_layer or cfg.num_heads
  mlp_dim = mlp_dim or cfg.mlp_dim
  check_targets(cfg, heads_per_layer, mlp_dim)
  if os.path.exists(os.path.join(out, checkpoint.CHECKPOINT_DIR)):
    raise ConfigError(f'--out {out} already holds checkpoints: choose a new directory')
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  if criterion == 'activation':
    tokenizer = tokenizer_lib.load(tokenizer_dir)
    batches = data.make_eval_batches(config, tokenizer, workdir, num_batches, 0, 1)
    head_scores, unit_scores = activation_scores(cfg, params, batches)
  else:
    head_scores, unit_scores = magnitude_scores(cfg, params)
  heads, units = select(head_scores, unit_scores, cfg, heads_per_layer, mlp_dim)
  new_cfg = pruned_config(cfg, heads_per_layer, mlp_dim)
  new_params = prune_params(cfg, params, heads, units)
  if scanned:
    new_params = _stack_layers(new_cfg.num_layers, new_params)

  for field in ('num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
    config.model[field] = getattr(new_cfg, field)
  # The parameters are whole (a LoRA run's adapters merged): the new workdir stands alone.
  config.init_from, config.init_step = '', -1
  if 'lora' in config:
    config.lora.rank = 0
  os.makedirs(out, exist_ok=True)
  if os.path.isdir(tokenizer_dir) and not os.path.isdir(os.path.join(out, 'tokenizer')):
    shutil.copytree(tokenizer_dir, os.path.join(out, 'tokenizer'))
  checkpoint.save_config(out, config)
  checkpoint.save_params(out, step, new_params)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  return {'step': step, 'params_before': count(params), 'params_after': count(new_params),
          'num_heads': new_cfg.num_heads, 'mlp_dim': new_cfg.mlp_dim,
          'kept_heads': heads.tolist(), 'kept_units': units.tolist()}
