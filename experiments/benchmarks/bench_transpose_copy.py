r"""Row-major transposing copies (`gpt_jax.backends.cpu.products._transposed_in_memory`, a layout constraint)
against the previous form (a 1-D reshape behind a barrier), in the train step, in one run.

  python experiments/benchmarks/bench_transpose_copy.py                  # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_transpose_copy.py --shapes=124m --dtypes=bfloat16 --blocks=6

With bf16 compute, every backward product of a projection takes one operand transposed in
memory (dy @ w.T, x.T @ dy). XLA:CPU compiled the reshape-behind-a-barrier form to an
elementwise loop, and compiles a copy with a fixed layout as a transpose. Both train steps are
bench_train.py's real step (same shapes, optimizer, donation), compiled in this process; the
previous form is put in `gpt_jax.backends.cpu.products` while its step is traced. Timed blocks alternate; each
row prints the median block's ms/step. In float32 both forms are the same program.
"""

import contextlib
import os
import sys
from unittest import mock

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax.backends.cpu import products as matmul  # noqa: E402


def reshaped_behind_barrier(x):
  """The previous form: x.T flattened behind an optimization barrier, then reshaped."""
  flat = jax.lax.optimization_barrier(x.T.reshape(-1))
  return flat.reshape(x.shape[::-1])


OURS = 'layout constraint'
VARIANTS = {
    OURS: contextlib.nullcontext,
    '1-D reshape': lambda: mock.patch.object(matmul, '_transposed_in_memory',
                                             reshaped_behind_barrier),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
