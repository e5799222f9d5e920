r"""The token embedding looked up in the parameters' dtype (`model.Transformer`) against a lookup
in the compute dtype, in the train step, in one run.

  python experiments/benchmarks/bench_embedding_lookup.py --dtypes=bfloat16   # baby, 10m, 124m
  python experiments/benchmarks/bench_embedding_lookup.py --dtypes=bfloat16 --shapes=124m --blocks=8

The residual stream is float32. A lookup in bf16 (flax's `nn.Embed(dtype=bfloat16)`) converts
the whole [vocab, emb] table to bf16 before taking the tokens' rows, which the model then
converts back to float32. Both train steps are bench_train.py's real step (same shapes,
optimizer, donation), compiled in this process; the bf16 lookup is put in the model while its
step is traced. Timed blocks alternate; each row prints the median block's ms/step. In float32
both are the same program.
"""

import contextlib
import os
import sys
from unittest import mock

import flax.linen as nn
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402


class Bfloat16Lookup(nn.Embed):
  """nn.Embed(dtype=bfloat16): the table converted to bf16, then the rows taken."""

  def __call__(self, inputs):
    return jnp.take(jnp.asarray(self.embedding, jnp.bfloat16), inputs, axis=0)


OURS = "parameters' dtype"
VARIANTS = {
    OURS: contextlib.nullcontext,
    'bf16 table': lambda: mock.patch.object(model.nn, 'Embed', Bfloat16Lookup),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
