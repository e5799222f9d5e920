r"""float32 products in the forms bf16 ones take (`gpt_jax.backends.cpu.products`'s custom VJPs: operands
row-major [n, k] @ [k, m], transposed ones copied first) against the plain products autodiff
gives, in the train step, in one run.

  python experiments/benchmarks/bench_float32_forms.py --dtypes=float32          # baby, 10m, 124m
  python experiments/benchmarks/bench_float32_forms.py --shapes=baby --dtypes=float32 --blocks=8

All steps are bench_train.py's real step (same shapes, optimizer, donation), compiled in this
process; the forms are put in the model while its step is traced. Timed blocks alternate; each
row prints the median block's ms/step.
"""

import os
import sys
from unittest import mock

import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402
from gpt_jax.backends.cpu import products as matmul_lib  # noqa: E402


def matmul_copied(x, w, dtype, w_transposed=False, out_dtype=None):
  return matmul_lib._low_precision_matmul(x, w, jnp.dtype(dtype), w_transposed,
                                          jnp.dtype(out_dtype or dtype))


def einsum_copied(spec, a, b, dtype, out_dtype=None):
  return matmul_lib._low_precision_einsum(spec, a, b, jnp.dtype(dtype),
                                          jnp.dtype(out_dtype or dtype))


OURS = 'plain'
VARIANTS = {
    OURS: lambda: mock.patch.object(model, 'matmul', matmul_lib.matmul),
    'copied projections': lambda: mock.patch.object(model, 'matmul', matmul_copied),
    'copied projections and attention': lambda: mock.patch.multiple(
        model, matmul=matmul_copied, einsum=einsum_copied),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
