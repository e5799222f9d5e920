r"""Bias gradients as a product (`gpt_jax.matmul.add_bias`) against a plain bias add, in the
train step, in one run.

  python experiments/benchmarks/bench_bias_gradient.py                  # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_bias_gradient.py --shapes=124m --dtypes=bfloat16 --blocks=3

A projection's bias gradient is the sum of its output gradient over the tokens. With bf16
compute, `model.Projection` adds its bias through `matmul.add_bias`, whose gradient is the
product ones[1, tokens] @ dy summed in float32; the reference adds it as `y + bias`, whose
gradient XLA reduces itself. Both train steps are bench_train.py's real step (same shapes,
optimizer, donation), compiled in this process; the reference projection is put in the model
while its step is traced. Timed blocks alternate; each row prints the median block's ms/step.
In float32 both forms are the same program.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import flax.linen as nn
import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import host_memory, model  # noqa: E402
from gpt_jax.matmul import matmul  # noqa: E402


class PlainBiasProjection(model.Projection):
  """model.Projection with its bias added as y + bias."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, self.shape, self.param_dtype)
    fan_in = math.prod(self.shape[:self.num_inputs])
    batch_shape = x.shape[:x.ndim - self.num_inputs]
    y = matmul(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1), self.dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, self.shape[self.num_inputs:], self.param_dtype)
      y = y + bias.reshape(-1).astype(self.dtype)
    return y.reshape(batch_shape + self.shape[self.num_inputs:])


OURS, PLAIN = 'add_bias', 'y + bias'
PROJECTIONS = {OURS: model.Projection, PLAIN: PlainBiasProjection}


def bench(name: str, dtype: str, blocks: int) -> dict:
  shape = bench_train.SHAPES[name]
  sides = {}
  for variant, projection in PROJECTIONS.items():
    model.Projection = projection  # what the model's layers build while this step is traced
    try:
      sides[variant] = bench_train.Ours(shape, dtype, 4)
    finally:
      model.Projection = PROJECTIONS[OURS]
  times = bench_train.alternate(sides, shape[6], blocks)
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
  print(f'| shape | dtype | {OURS} ms/step | {PLAIN} ms/step | speedup |')
  print('|---|---|---|---|---|')
  rows = []
  for name in args.shapes.split(','):
    for dtype in args.dtypes.split(','):
      row = bench(name, dtype, args.blocks)
      rows.append(row)
      ms = row['ms_per_step']
      print(f'| {name} | {dtype} | {ms[OURS]:.1f} | {ms[PLAIN]:.1f} | {ms[PLAIN] / ms[OURS]:.2f}x |',
            flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                 'argv': sys.argv[1:], 'jax': jax.__version__, 'load_average': os.getloadavg(),
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
