r"""One product on XLA:CPU: float32 against int8 x int8 with int32 sums, and one row padded to two.

  python experiments/quantize/bench_int8_products.py

GPT-2 124M's MLP input product, [rows, 768] @ [768, 3072], at 1, 2 and 8 rows: float32
(`x @ w`), int8 weight-only (`x @ (w_int8 * scale)`), and `lax.dot_general` of int8 operands
with `preferred_element_type=int32`, at one row as it is and as gpt_jax.backends runs it (a
zero row added). The kinds take turns in each of --rounds rounds; each time is the best of 50
calls; the ratio against float32 is the median over rounds. Also prints which kernel XLA
compiled each int8 product to.
"""

import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.backends.cpu import products

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds.')
K, M = 768, 3072


def best_of(f, args, calls: int = 50) -> float:
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - start)
  return best


def plain_int8(x, w):
  return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def kernel_of(f, args) -> str:
  text = jax.jit(f).lower(*args).compile().as_text()
  if '__ynn_fusion' in text:
    return 'YNNPACK int8 fusion'
  if 's32[768,3072]' in text and 'convert' in text:
    return 'kernel converted to int32, then a generic dot'
  return 'other'


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(K, M)), jnp.float32)
  w8 = jnp.asarray(rng.integers(-127, 128, (K, M)), jnp.int8)
  scale = jnp.ones((1, M), jnp.float32)
  for rows in (1, 2, 8):
    x = jnp.asarray(rng.normal(size=(rows, K)), jnp.float32)
    x8 = jnp.asarray(rng.integers(-127, 128, (rows, K)), jnp.int8)
    kinds = {'float32': (jax.jit(lambda x, w: x @ w), (x, w)),
             'int8 weight-only': (jax.jit(lambda x, w, s: x @ (w.astype(jnp.float32) * s)),
                                  (x, w8, scale)),
             'int8 x int8': (jax.jit(plain_int8), (x8, w8))}
    if rows == 1:
      kinds['int8 x int8, padded to 2 rows'] = (jax.jit(products.int8_matmul), (x8, w8))
    for f, args in kinds.values():
      jax.block_until_ready(f(*args))
    times = {name: [] for name in kinds}
    for r in range(_ROUNDS.value):
      names = list(kinds)[r % len(kinds):] + list(kinds)[:r % len(kinds)]
      for name in names:
        times[name].append(best_of(*kinds[name]))
    for name in kinds:
      ratio = statistics.median(t / f for t, f in zip(times['float32'], times[name]))
      kernel = '' if name in ('float32', 'int8 weight-only') else f' ({kernel_of(*kinds[name])})'
      print(f'| {rows} | {name}{kernel} | {statistics.median(times[name]) * 1e6:.0f} us | '
            f'{ratio:.2f}x |', flush=True)


if __name__ == '__main__':
  app.run(main)
