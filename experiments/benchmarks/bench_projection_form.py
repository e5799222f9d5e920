r"""The model's projections as 2-D products against the multi-axis einsum form, in one run.

  python experiments/benchmarks/bench_projection_form.py                 # baby, 10m, 124m
  python experiments/benchmarks/bench_projection_form.py --shapes=baby --blocks=8
  python experiments/benchmarks/bench_projection_form.py --isolated_mlp   # one MLP's gradient

`model.Projection` computes x @ kernel as [tokens, fan_in] @ [fan_in, fan_out]. The reference
is the form it replaced: one einsum over the activation's and the kernel's own axes
('bte,ehd->bthd', 'bthv,hve->bte', ...), as flax's nn.Einsum computed it. Both train steps are
bench_train.py's real step (same shapes, optimizer, donation), compiled in this process; the
einsum form is put back by a flax method interceptor while its step is traced. Timed blocks
alternate, and each row prints the median block's ms/step of both and their ratio.
--isolated_mlp times only the gradient of one SwiGLU MLP at the speedrun's shape (768 tokens,
128 -> 352), written both ways.
"""

import argparse
import math
import os
import statistics
import string
import sys

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax.model import Projection  # noqa: E402


def _einsum_form(next_fun, args, kwargs, context):
  """Projection.__call__ as one einsum over the activation's and the kernel's own axes."""
  module = context.module
  if (not isinstance(module, Projection) or context.method_name != '__call__'
      or module.is_initializing()):  # initialisation creates the same parameters either way
    return next_fun(*args, **kwargs)
  x = args[0]
  letters = iter(string.ascii_lowercase)
  batch = ''.join(next(letters) for _ in range(x.ndim - module.num_inputs))
  inputs = ''.join(next(letters) for _ in range(module.num_inputs))
  outputs = ''.join(next(letters) for _ in range(len(module.shape) - module.num_inputs))
  kernel = module.get_variable('params', 'kernel')
  y = jnp.einsum(f'{batch}{inputs},{inputs}{outputs}->{batch}{outputs}',
                 x.astype(module.dtype), kernel.astype(module.dtype))
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(module.dtype)
  return y


def bench(name: str, blocks: int) -> dict:
  shape = bench_train.SHAPES[name]
  steps = shape[6]
  sides = {'2-D products': bench_train.Ours(shape, 'float32', 4)}
  with nn.intercept_methods(_einsum_form):  # active while the step is traced and compiled
    sides['einsum form'] = bench_train.Ours(shape, 'float32', 4)
  times = bench_train.alternate(sides, steps, blocks)
  medians = {side: statistics.median(t) for side, t in times.items()}
  losses = {side: s.last_loss for side, s in sides.items()}
  return {'ms_per_step': medians, 'last_loss': losses,
          'speedup': medians['einsum form'] / medians['2-D products']}


def isolated_mlp(blocks: int, calls: int = 100) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((12, 64, 128), np.float32))
  weights = tuple(jnp.asarray(rng.random(shape, np.float32)) * 0.1
                  for shape in ((128, 352), (128, 352), (352, 128)))

  def einsum_form(weights, x):
    gate, up, down = weights
    h = jax.nn.silu(jnp.einsum('bte,em->btm', x, gate)) * jnp.einsum('bte,em->btm', x, up)
    return jnp.einsum('btm,me->bte', h, down).sum()

  def products_2d(weights, x):
    gate, up, down = weights
    rows = x.reshape(-1, x.shape[-1])
    return ((jax.nn.silu(rows @ gate) * (rows @ up)) @ down).sum()

  grads = {name: jax.jit(jax.grad(f, argnums=(0, 1)))
           for name, f in (('2-D products', products_2d), ('einsum form', einsum_form))}
  times = {name: [] for name in grads}
  for grad in grads.values():
    jax.block_until_ready(grad(weights, x))
  for _ in range(blocks):
    for name, grad in grads.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = grad(weights, x)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls * 1000)
  medians = {name: statistics.median(t) for name, t in times.items()}
  return {'ms_per_step': medians, 'speedup': medians['einsum form'] / medians['2-D products']}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default='baby,10m,124m')
  p.add_argument('--blocks', type=int, default=0, help='timed blocks per side (0: per shape)')
  p.add_argument('--isolated_mlp', action='store_true',
                 help='time one SwiGLU MLP gradient instead of the train steps')
  args = p.parse_args()
  if args.isolated_mlp:
    row = isolated_mlp(args.blocks or 5)
    ms = row['ms_per_step']
    print(f"SwiGLU MLP gradient: 2-D products {ms['2-D products']:.2f} ms, einsum form "
          f"{ms['einsum form']:.2f} ms, speedup {row['speedup']:.2f}x")
    return
  print('| shape | 2-D products ms/step | einsum form ms/step | speedup |\n|---|---|---|---|')
  for name in args.shapes.split(','):
    row = bench(name, args.blocks or max(bench_train.SHAPES[name][7], 4))
    ms = row['ms_per_step']
    print(f"| {name} | {ms['2-D products']:.1f} | {ms['einsum form']:.1f} | "
          f"{row['speedup']:.2f}x |", flush=True)
    assert math.isclose(*row['last_loss'].values(), rel_tol=1e-3), row['last_loss']


if __name__ == '__main__':
  main()
