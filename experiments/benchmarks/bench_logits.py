r"""The output head's float32 sums returned as the logits (`matmul(..., out_dtype=float32)`)
against rounding them to the compute dtype and back to float32, in the train step, in one run.

  python experiments/benchmarks/bench_logits.py --dtypes=bfloat16          # baby, 10m, 124m
  python experiments/benchmarks/bench_logits.py --shapes=124m --dtypes=bfloat16 --blocks=6

Both train steps are bench_train.py's real step (same shapes, optimizer, donation), compiled in
this process; the rounding form is put in the model while its step is traced. In float32 the
two forms are the same program. Timed blocks alternate; each row prints the median block's
ms/step.
"""

import os
import sys
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402
from gpt_jax.backends.cpu import products as matmul_lib  # noqa: E402


def rounded_to_compute_dtype(x, w, dtype, w_transposed=False, out_dtype=None):
  """The head as it was: the product returned in the compute dtype, then converted."""
  return matmul_lib.matmul(x, w, dtype, w_transposed).astype(out_dtype or dtype)


OURS = 'float32 sums'
VARIANTS = {
    OURS: lambda: mock.patch.object(model, 'matmul', matmul_lib.matmul),
    'rounded to the compute dtype': lambda: mock.patch.object(
        model, 'matmul', rounded_to_compute_dtype),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
