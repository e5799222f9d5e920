r"""The model's attention against earlier forms of it and jax.nn.dot_product_attention, in the
train step, in one run.

  python experiments/benchmarks/bench_attention.py                       # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_attention.py --shapes=10m --dtypes=float32 --blocks=6

`model.masked_attention` writes attention as two einsums over [batch, heads, t, s] logits
through `gpt_jax.matmul.einsum` and, the mask being causal, computes the first half of the
queries over the first half of the keys only. The others: "whole logits", the same without
the halves; "jnp.einsum", the einsums as `jnp.einsum` (bf16 sums in the second product, float32
gradient products for the logits); "jax.nn", `jax.nn.dot_product_attention` (the same float32
logits and softmax). All train steps are bench_train.py's real step (same shapes, optimizer,
donation), compiled in this process; each variant is put in the model while its step is
traced. Timed blocks alternate; each row prints the median block's ms/step and the speedups.
"""

import argparse
import datetime
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import host_memory, model  # noqa: E402



def jnp_einsum_attention(q, k, v, mask, causal=False):
  """model.masked_attention as it was before its products went through gpt_jax.matmul.einsum:
  the same two einsums by jnp.einsum, float32 sums asked for in the logits only, so that in
  bf16 the second product sums in bf16 and the logits' gradients are float32 products."""
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  if kv_heads == heads:
    scores, weighted = 'btnd,bsnd->bnts', 'bnts,bsnd->btnd'
  else:
    scores, weighted = 'btkgd,bskd->bkgts', 'bkgts,bskd->btkgd'
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    mask = mask[:, :, None]
  logits = jnp.einsum(scores, q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits * d ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(weighted, probs, v).reshape(b, t, heads, d)


OURS = 'masked_attention'
masked_attention = model.masked_attention  # the model's, before bench() swaps in a variant
VARIANTS = {
    OURS: masked_attention,
    'whole logits': lambda q, k, v, mask, causal=False: masked_attention(q, k, v, mask),
    'jnp.einsum': jnp_einsum_attention,
    'jax.nn': lambda q, k, v, mask, causal=False: jax.nn.dot_product_attention(q, k, v, mask=mask),
}


def bench(name: str, dtype: str, blocks: int) -> dict:
  shape = bench_train.SHAPES[name]
  steps = shape[6]
  sides = {}
  for variant, attention in VARIANTS.items():
    model.masked_attention = attention  # what Attention calls while this step is traced
    try:
      sides[variant] = bench_train.Ours(shape, dtype, 4)
    finally:
      model.masked_attention = VARIANTS[OURS]
  times = bench_train.alternate(sides, steps, blocks)
  medians = {variant: statistics.median(t) for variant, t in times.items()}
  return {'shape': name, 'dtype': dtype, 'ms_per_step': medians, 'blocks': times,
          'last_loss': {variant: side.last_loss for variant, side in sides.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='baby,10m,124m')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--blocks', type=int, default=4, help='timed blocks per variant')
  parser.add_argument('--json', default='', help='write every row and block time here')
  args = parser.parse_args()
  host_memory.keep_freed_memory()  # as gpt_jax.train does on CPU; before JAX starts
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs')
  others = [name for name in VARIANTS if name != OURS]
  print(f'| shape | dtype | {OURS} ms/step | '
        + ' | '.join(f'{name} ms/step' for name in others) + ' | '
        + ' | '.join(f'speedup over {name}' for name in others) + ' |')
  print('|---' * (3 + 2 * len(others)) + '|')
  rows = []
  for name in args.shapes.split(','):
    for dtype in args.dtypes.split(','):
      row = bench(name, dtype, args.blocks)
      rows.append(row)
      ms = row['ms_per_step']
      print(f'| {name} | {dtype} | {ms[OURS]:.1f} | '
            + ' | '.join(f'{ms[other]:.1f}' for other in others) + ' | '
            + ' | '.join(f'{ms[other] / ms[OURS]:.2f}x' for other in others) + ' |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                 'argv': sys.argv[1:], 'jax': jax.__version__, 'load_average': os.getloadavg(),
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
