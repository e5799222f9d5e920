r"""Global-norm clipping as one scalar factor on the norm the train step computed
(`optim.clip_by_global_norm`) against `optax.clip_by_global_norm`, in the train step, in one run.

  python experiments/benchmarks/bench_clipping.py                  # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_clipping.py --shapes=124m --dtypes=bfloat16 --blocks=6

optax's form computes the gradients' norm again inside the update (the step computed it for its
metrics and its non-finite guard) and selects between each gradient and its clipped copy, which
XLA:CPU writes to memory and AdamW reads beside the gradient. Both train steps are
bench_train.py's real step (same shapes, AdamW, donation), compiled in this process; optax's
clipping is put in the optimizer while its step is built. Timed blocks alternate; each row prints
the median block's ms/step.
"""

import contextlib
import os
import sys
from unittest import mock

import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import optim  # noqa: E402

OURS = 'optim.clip_by_global_norm'
VARIANTS = {
    OURS: contextlib.nullcontext,
    'optax.clip_by_global_norm': lambda: mock.patch.object(
        optim, 'clip_by_global_norm', optax.clip_by_global_norm),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
