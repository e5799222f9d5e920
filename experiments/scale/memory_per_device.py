r"""Memory per device of parameters, gradients and Adam state for GPT-2 sizes under several meshes.

  python experiments/scale/memory_per_device.py [--devices=8] [--batch_per_device=8]

Shapes come from jax.eval_shape of the real model and optimizer, shardings from the real rules
table (gpt_jax.sharding): no device memory is touched, so it runs anywhere. Activations are
estimated separately: per layer and token, about 34·emb + 5·heads·seq bytes in bfloat16
(Korthikanti et al. 2022), and only the block inputs (2·emb bytes) with remat=full.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gpt_jax import sharding
from gpt_jax.model import ModelConfig, Transformer

MODELS = {  # (layers, emb, heads, context)
    'gpt2_124m': (12, 768, 12, 1024),
    'gpt2_350m': (24, 1024, 16, 1024),
    'gpt3_1.3b': (24, 2048, 16, 2048),
}


def state_bytes_per_device(cfg: ModelConfig, mesh_sizes: dict[str, int]) -> tuple[int, int]:
  """(bytes per device, total bytes) of params + grads + AdamW state."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  specs = nn.get_partition_spec(boxed)['params']
  params = nn.unbox(boxed)['params']
  mesh_specs = nn.logical_to_mesh(specs, sharding.LOGICAL_RULES)
  per_device = total = 0
  for leaf, spec in zip(jax.tree.leaves(params),
                        jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
    parts = 1
    for axes in spec:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        parts *= mesh_sizes.get(axis, 1) if axis else 1
    nbytes = leaf.size * leaf.dtype.itemsize
    # parameter + gradient + AdamW's two moments (optax keeps them in the parameters' dtype
    # and sharding)
    per_device += 4 * nbytes // parts
    total += 4 * nbytes
  return per_device, total


def activation_bytes(cfg: ModelConfig, seq: int, batch: int, remat: bool) -> int:
  if remat:
    return cfg.num_layers * batch * seq * 2 * cfg.emb_dim
  return cfg.num_layers * batch * seq * (34 * cfg.emb_dim + 5 * cfg.num_heads * seq)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch_per_device', type=int, default=8)
  args = parser.parse_args()
  n = args.devices
  meshes = [(n, 1, 1), (1, n, 1), (n // 2, 2, 1) if n >= 4 else (n, 1, 1), (1, n // 2, 2),
            (1, n // 4, 4) if n >= 8 else (1, n, 1)]
  print(f'| model | params | mesh (data, fsdp, tensor) | params+grads+Adam per device | '
        f'activations per device, batch {args.batch_per_device}/device (none / full remat) |')
  print('|---|---|---|---|---|')
  for name, (layers, emb, heads, seq) in MODELS.items():
    cfg = ModelConfig(vocab_size=50304, max_len=seq, num_layers=layers, num_heads=heads,
                      emb_dim=emb, mlp_dim=4 * emb, compute_dtype='bfloat16')
    for mesh in dict.fromkeys(meshes):
      per_device, total = state_bytes_per_device(cfg, dict(zip(sharding.MESH_AXES, mesh)))
      batch = args.batch_per_device
      act = activation_bytes(cfg, seq, batch, False) / mesh[2]
      act_remat = activation_bytes(cfg, seq, batch, True) / mesh[2]
      print(f'| {name} | {total / 16 / 1e6:.0f}M | {mesh} | {per_device / 2**30:.2f} GiB | '
            f'{act / 2**30:.1f} / {act_remat / 2**30:.2f} GiB |')


if __name__ == '__main__':
  main()
