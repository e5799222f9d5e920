r"""Bias gradients as a product (`gpt_jax.backends.cpu.products.add_bias`) against a plain bias add, in the
train step, in one run.

  python experiments/benchmarks/bench_bias_gradient.py                  # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_bias_gradient.py --shapes=124m --dtypes=bfloat16 --blocks=3

A projection's bias gradient is the sum of its output gradient over the tokens. With bf16
compute, `model.Projection` adds its bias through `matmul.add_bias`, whose gradient is the
product ones[1, tokens] @ dy summed in float32; the reference adds it as `y + bias`, whose
gradient XLA reduces itself. Both train steps are bench_train.py's real step (same shapes,
optimizer, donation), compiled in this process; the plain add is put in the model while its
step is traced. Timed blocks alternate; each row prints the median block's ms/step.
In float32 both forms are the same program.
"""

import contextlib
import os
import sys
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402

OURS = 'add_bias'
VARIANTS = {
    OURS: contextlib.nullcontext,
    'y + bias': lambda: mock.patch.object(model, 'add_bias',
                                          lambda y, bias: y + bias.astype(y.dtype)),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
