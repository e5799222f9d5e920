r"""GFLOP/s of the three products of a projection, in the forms XLA:CPU can be given, against torch.

  python experiments/benchmarks/bench_matmul_forms.py              # GPT-2 124M's shapes, ~1 min
  python experiments/benchmarks/bench_matmul_forms.py --tokens=768 --shapes=128x352,352x128

For y = x @ w (x [tokens, fan_in], w [fan_in, fan_out]) and its gradients dx = dy @ w.T and
dw = x.T @ dy, each timed alone (jitted, inputs resident) in float32 and bfloat16:
- `plain`: the product as autodiff writes it, output in the inputs' dtype;
- `f32 acc`: preferred_element_type=float32 (what gpt_jax.backends.cpu.products asks for);
- dw only, `f32 acc + row-major x.T`: the left operand copied into transposed memory order first
  (what gpt_jax.backends.cpu.products does on CPU), the copy included in the time;
- `torch`: the same product in torch at 2 threads (bf16 tensors in, bf16 out).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from gpt_jax.backends.cpu.products import _transposed_in_memory  # noqa: E402


def seconds_per_call(fn, *args, min_seconds=0.5):
  jax.block_until_ready(fn(*args))
  calls, start = 0, time.perf_counter()
  while True:
    out = fn(*args)
    calls += 1
    if calls % 4 == 0:
      jax.block_until_ready(out)
      elapsed = time.perf_counter() - start
      if elapsed > min_seconds:
        return elapsed / calls


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--tokens', type=int, default=1024)
  p.add_argument('--shapes', default='768x3072,3072x768,768x50304',
                 help='fan_in x fan_out pairs (default: GPT-2 124M MLP in, MLP out, output head)')
  p.add_argument('--torch_threads', type=int, default=2)
  a = p.parse_args()
  torch.set_num_threads(a.torch_threads)
  f32 = jnp.float32
  print(f'jax {jax.__version__}, torch {torch.__version__}, {a.tokens} tokens')
  print('| product | fan_in x fan_out | dtype | plain | f32 acc | f32 acc + row-major x.T | '
        'torch |')
  print('|---|---|---|---|---|---|---|')
  rng = np.random.default_rng(0)
  for shape in a.shapes.split(','):
    k, m = (int(s) for s in shape.split('x'))
    n = a.tokens
    flop = 2 * n * k * m
    for dtype in ('float32', 'bfloat16'):
      x = jnp.asarray(rng.standard_normal((n, k)), dtype)
      w = jnp.asarray(rng.standard_normal((k, m)), dtype)
      dy = jnp.asarray(rng.standard_normal((n, m)), dtype)
      tx, tw, tdy = (torch.from_numpy(np.asarray(v, np.float32)).to(getattr(torch, dtype))
                     for v in (x, w, dy))
      products = {
          'y = x @ w': ('nk,km->nm', (x, w), lambda: tx @ tw),
          'dx = dy @ w.T': ('nm,km->nk', (dy, w), lambda: tdy @ tw.T),
          'dw = x.T @ dy': ('nk,nm->km', (x, dy), lambda: tx.T @ tdy),
      }
      for name, (spec, args, torch_fn) in products.items():
        plain = jax.jit(lambda u, v, spec=spec: jnp.einsum(spec, u, v))
        acc = jax.jit(lambda u, v, spec=spec: jnp.einsum(spec, u, v, preferred_element_type=f32))
        cells = [flop / seconds_per_call(plain, *args), flop / seconds_per_call(acc, *args)]
        if name.startswith('dw'):
          copied = jax.jit(lambda u, v: jnp.matmul(_transposed_in_memory(u), v,
                                                   preferred_element_type=f32))
          cells.append(flop / seconds_per_call(copied, *args))
        else:
          cells.append(None)
        torch_fn()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.5:
          torch_fn()
          calls += 1
        cells.append(flop * calls / (time.perf_counter() - start))
        print(f'| {name} | {k} x {m} | {dtype} | ' + ' | '.join(
            '—' if c is None else f'{c / 1e9:.0f}' for c in cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
