"""LoRA adapters as a parameter subtree: split from the base, combine for a forward pass, merge.

A model built with `Transformer(cfg, LoraConfig(rank=r, ...))` has, beside every target
projection `<name>` (kernel W, input axes then output axes), parameters `<name>_lora_a`
(input axes x r) and `<name>_lora_b` (r x output axes). Its output is x W + scale * x A B.
Fine-tuning trains only the adapters; `merge` folds them into W: W + scale * A B.
"""

from flax import traverse_util
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
