"""LoRA adapters as a parameter subtree: split from the base, combine for a forward pass, merge.

A model built with `Transformer(cfg, LoraConfig(rank=r, ...))` has, beside every target
projection `<name>` (kernel W, input axes then output axes), parameters `<name>_lora_a`
(input axes x r) and `<name>_lora_b` (r x output axes). Its output is x W + scale * x A B.
Fine-tuning trains only the adapters; `merge` folds them into W: W + scale * A B.

`Trainable` says which parameters a run trains (all of them, or the adapters and optionally the
embedding rows of chosen tokens) and splits a parameter tree into (trainable, frozen).
`grow_vocab` adds embedding rows for tokens a pretrained model has no room for.
"""

import dataclasses

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.model import LoraConfig

_SUFFIXES = ('_lora_a', '_lora_b')


def _is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(_SUFFIXES)


def split(params) -> tuple[dict, dict]:
  """(base parameters, adapter parameters): two nested dicts with disjoint leaves."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if not _is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if _is_adapter(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def combine(base, adapters) -> dict:
  """The full parameter tree of an adapted model."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def merge(params, lora: LoraConfig) -> dict:
  """Parameters without adapters, each target kernel W replaced by W + scale * A B."""
  flat = traverse_util.flatten_dict(params)
  merged = {k: v for k, v in flat.items() if not _is_adapter(k)}
  for path in flat:
    if not path[-1].endswith('_lora_a'):
      continue
    name = path[-1][:-len('_lora_a')]
    a, b = flat[path], flat[path[:-1] + (name + '_lora_b',)]
    kernel_path = path[:-1] + (name, 'kernel')
    kernel = merged[kernel_path]
    # Leading axes shared by all three (the layer axis of scanned parameters) stay batched.
    lead = a.ndim + b.ndim - kernel.ndim - 2
    a2 = a.reshape(a.shape[:lead] + (-1, lora.rank)).astype(jnp.float32)
    b2 = b.reshape(b.shape[:lead] + (lora.rank, -1)).astype(jnp.float32)
    update = jnp.matmul(a2, b2).reshape(kernel.shape)
    merged[kernel_path] = (kernel.astype(jnp.float32) + lora.scale * update).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged)


def count(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))


def grow_vocab(params, vocab_size: int) -> dict:
  """`params` with `vocab_size` rows in wte (and columns in an untied lm_head).

  Every new row is the mean of the existing rows: deterministic, so the grown model can be
  rebuilt from its base, and with logits close to the average token's rather than random.
  """
  params = dict(params)
  wte = params['wte']['embedding']
  extra = vocab_size - wte.shape[0]
  if extra <= 0:
    return params
  mean = wte.astype(jnp.float32).mean(axis=0, keepdims=True).astype(wte.dtype)
  params['wte'] = {'embedding': jnp.concatenate([wte, jnp.repeat(mean, extra, axis=0)])}
  if 'lm_head' in params:
    kernel = params['lm_head']['kernel']  # [embed, vocab]
    mean = kernel.astype(jnp.float32).mean(axis=1, keepdims=True).astype(kernel.dtype)
    params['lm_head'] = {'kernel': jnp.concatenate([kernel, jnp.repeat(mean, extra, axis=1)],
                                                   axis=1)}
  return params


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


TOKEN_ROWS = 'token_rows'  # the trainable subtree holding the rows of `Trainable.token_ids`


def _take(x, ids: tuple[int, ...], axis: int):
  """x[ids] along `axis`; a partitioning box keeps its names, the taken axis replicated."""
  if isinstance(x, nn.Partitioned):
    names = list(x.names)
    names[axis] = None
    return x.replace(value=jnp.take(x.value, jnp.asarray(ids), axis=axis), names=tuple(names))
  return jnp.take(x, jnp.asarray(ids), axis=axis)


@dataclasses.dataclass(frozen=True)
class Trainable:
  """Which parameters a run trains.

  With `lora.rank == 0`, all of them (nothing is frozen). Otherwise the adapters, plus the
  embedding rows (and untied lm_head columns) of `token_ids`: tokens added for fine-tuning,
  whose rows the frozen base never learned.
  """
  lora: LoraConfig
  token_ids: tuple[int, ...] = ()

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen). Leaves may be arrays, abstract arrays or partitioning boxes."""
    if self.lora.rank == 0:
      return params, {}
    base, adapters = split(params)
    if self.token_ids:
      rows = {'wte': _take(base['wte']['embedding'], self.token_ids, axis=0)}
      if 'lm_head' in base:
        rows['lm_head'] = _take(base['lm_head']['kernel'], self.token_ids, axis=1)
      adapters = {**adapters, TOKEN_ROWS: rows}
    return adapters, base

  def assemble(self, trainable, frozen) -> dict:
    """The full parameter tree (with adapters) from a split."""
    if self.lora.rank == 0:
      return trainable
    trainable = dict(trainable)
    rows = trainable.pop(TOKEN_ROWS, None)
    params = combine(frozen, trainable)
    if rows is not None:
      ids = jnp.asarray(self.token_ids)
      wte = params['wte']['embedding']
      params['wte'] = {'embedding': wte.at[ids].set(rows['wte'].astype(wte.dtype))}
      if 'lm_head' in rows:
        kernel = params['lm_head']['kernel']
        params['lm_head'] = {'kernel': kernel.at[:, ids].set(rows['lm_head'].astype(
            kernel.dtype))}
    return params
