"""Greedy token choice over a vocabulary: jnp.argmax against decode.greedy_tokens (two levels).

  python experiments/bench_decode/bench_greedy_tokens.py

Each form is jitted alone and timed on the same logits, alternating; prints the median time of
each and their ratio, for GPT-2's vocabulary (50,257 ids, no multiple of the 128-id chunk) and
its padded table (50,304), at 1 and 8 rows. Both forms must pick the same ids.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import decode


def _median_ms(fn, x, calls: int) -> float:
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--calls', type=int, default=100, help='timed calls per form and round')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  one_level = jax.jit(lambda logits: jnp.argmax(logits, axis=-1))
  two_levels = jax.jit(decode.greedy_tokens)
  print('| rows | vocabulary | jnp.argmax ms | greedy_tokens ms | speedup |')
  print('|---|---|---|---|---|')
  for rows in (1, 8):
    for vocab in (50257, 50304):
      logits = jnp.asarray(np.random.default_rng(0).standard_normal((rows, vocab)), jnp.float32)
      expected = np.argmax(np.asarray(logits), axis=-1)
      for fn in (one_level, two_levels):
        np.testing.assert_array_equal(fn(logits), expected)
      one, two = [], []
      for _ in range(args.rounds):
        one.append(_median_ms(one_level, logits, args.calls))
        two.append(_median_ms(two_levels, logits, args.calls))
      one_ms, two_ms = float(np.median(one)), float(np.median(two))
      print(f'| {rows} | {vocab:,} | {one_ms:.3f} | {two_ms:.3f} | {one_ms / two_ms:.1f}x |')


if __name__ == '__main__':
  main()
