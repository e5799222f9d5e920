r"""GPT-2's GELU with a recomputing gradient (`gpt_jax.backends.cpu.gelu.gelu`) against
`jax.nn.gelu(approximate=True)` differentiated as written, in the train step, in one run.

  python experiments/benchmarks/bench_gelu.py                  # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_gelu.py --shapes=124m --dtypes=bfloat16 --blocks=6

Both train steps are bench_train.py's real step (same shapes, optimizer, donation), compiled in
this process; `jax.nn.gelu` is put in the model while its step is traced. Timed blocks
alternate; each row prints the median block's ms/step.
"""

import contextlib
import functools
import os
import sys
from unittest import mock

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402

OURS = 'backends.cpu.gelu'
VARIANTS = {
    OURS: contextlib.nullcontext,
    'jax.nn.gelu': lambda: mock.patch.object(
        model, 'gelu', functools.partial(jax.nn.gelu, approximate=True)),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
