r"""How fast a training step could be if it did nothing but its matrix products.

  python experiments/benchmarks/bench_product_bound.py                     # baby, float32
  python experiments/benchmarks/bench_product_bound.py --shape=124m --dtype=bfloat16 --blocks=3
  python experiments/benchmarks/bench_product_bound.py --json=/tmp/bound.json

Every `dot_general` of gpt_jax's jitted train step (forward, backward and optimizer, read from
the step's jaxpr, counting a scanned body once per iteration) is replayed on random operands of
the same shapes and dtypes, all of them in one jitted call (XLA:CPU, the same products the step
compiles to) and, as a second opinion, as the same `torch.einsum`s (oneDNN / MKL). Neither does
anything but products, and XLA may run independent products side by side, so the faster of the
two is a lower bound on the step's product time. In the same run, timed blocks alternating, the
PyTorch reference step of `bench_train.py` runs in its own process: reference step / product
time is the largest speedup over it that any step built from these products could reach.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..', '..'))
import bench_train  # noqa: E402
from gpt_jax import flops  # noqa: E402
from gpt_jax.backends.cpu import host_memory  # noqa: E402
from gpt_jax.flops import product_flops, step_products  # noqa: E402,F401


def einsum_equation(product) -> str:
  """The torch.einsum equation of a dot_general: batch, lhs free, rhs free output order."""
  lhs_shape, rhs_shape, _, _, ((lc, rc), (lb, rb)), _ = product
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  lhs = [next(letters) for _ in lhs_shape]
  rhs = [None] * len(rhs_shape)
  for l, r in zip(lc, rc):
    rhs[r] = lhs[l]
  for l, r in zip(lb, rb):
    rhs[r] = lhs[l]
  rhs = [c or next(letters) for c in rhs]
  out = ([lhs[d] for d in lb] + [lhs[d] for d in range(len(lhs)) if d not in lc + lb]
         + [rhs[d] for d in range(len(rhs)) if d not in rc + rb])
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


class XlaProducts:
  def __init__(self, products):
    rng = np.random.default_rng(0)
    self.operands = [tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                           for shape, dtype in ((p[0], p[2]), (p[1], p[3])))
                     for p in products]

    def run_all(operands):
      return [jax.lax.dot_general(a, b, p[4], preferred_element_type=p[5])
              for (a, b), p in zip(operands, products)]
    self.run = jax.jit(run_all)
    jax.block_until_ready(self.run(self.operands))

  def steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      out = self.run(self.operands)
    jax.block_until_ready(out)
    return time.perf_counter() - start


class TorchProducts:
  def __init__(self, products):
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
    gen = torch.Generator().manual_seed(0)
    self.calls = [(einsum_equation(p), torch.randn(p[0], generator=gen).to(dtypes[p[2]]),
                   torch.randn(p[1], generator=gen).to(dtypes[p[3]])) for p in products]

  def steps(self, n: int) -> float:
    torch.set_num_threads(2)
    start = time.perf_counter()
    for _ in range(n):
      for equation, a, b in self.calls:
        torch.einsum(equation, a, b)
    return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shape', default='baby', choices=sorted(bench_train.SHAPES))
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--blocks', type=int, default=6, help='timed blocks per side')
  parser.add_argument('--json', default='', help='write the result and every block time here')
  args = parser.parse_args()
  host_memory.keep_freed_memory()  # as bench_train.py and gpt_jax.train do on CPU
  shape = bench_train.SHAPES[args.shape]
  block_steps = shape[6]
  peak = flops.measure_matmul_peak(args.dtype)

  ours = bench_train.Ours(shape, args.dtype, num_batches=4)
  with jax.set_mesh(ours.mesh), nn.logical_axis_rules(ours.rules):
    traced = ours.step_jit.trace(ours.state, ours.batches[0], {})
  products = step_products(traced.jaxpr)
  product_gflop = sum(map(product_flops, products)) / 1e9
  tokens = shape[3] * shape[4]
  model_gflop = flops.train_flops_per_token(ours.model_cfg, shape[3]) * tokens / 1e9

  sides = {'gpt_jax step': ours, 'XLA products': XlaProducts(products),
           'torch products': TorchProducts(products),
           'torch step': bench_train.ReferenceInOwnProcess(shape, args.dtype, 4)}
  times = bench_train.alternate(sides, block_steps, args.blocks)
  sides['torch step'].close()
  ms = {name: statistics.median(t) for name, t in times.items()}
  products_ms = min(ms['XLA products'], ms['torch products'])

  print(f'{args.shape} {args.dtype}: {len(products)} products, {product_gflop:.2f} GFLOP '
        f'(model FLOPs {model_gflop:.2f} GFLOP); matmul peak {peak / 1e9:.0f} GFLOP/s')
  print('| side | ms/step | GFLOP/s of products |')
  print('|---|---|---|')
  for name in sides:
    print(f'| {name} | {ms[name]:.1f} | {product_gflop / ms[name] * 1e3:.0f} |')
  print(f"gpt_jax step / torch step: {ms['torch step'] / ms['gpt_jax step']:.2f}x; "
        f"the products alone ({products_ms:.1f} ms) cap any step at "
        f"{ms['torch step'] / products_ms:.2f}x the torch step")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                 'argv': sys.argv[1:], 'jax': jax.__version__, 'torch': torch.__version__,
                 'load_average': os.getloadavg(), 'products': len(products),
                 'product_gflop': product_gflop, 'model_gflop': model_gflop,
                 'peak_flops': peak, 'ms_per_step': ms, 'block_ms': times,
                 'speedup_cap_vs_torch_step': ms['torch step'] / products_ms}, f, indent=1)


if __name__ == '__main__':
  main()
