r"""The model's attention against earlier forms of it and jax.nn.dot_product_attention, in the
train step, in one run.

  python experiments/benchmarks/bench_attention.py                       # baby, 10m, 124m; float32 and bf16
  python experiments/benchmarks/bench_attention.py --shapes=10m --dtypes=float32 --blocks=6

`model.masked_attention` writes attention as two einsums over [batch, heads, t, s] logits
through `gpt_jax.backends.cpu.products.einsum` and, the mask being causal, computes the first half of the
queries over the first half of the keys only. The others: "whole logits", the same without
the halves; "jnp.einsum", the einsums as `jnp.einsum` (bf16 sums in the second product, float32
gradient products for the logits); "jax.nn", `jax.nn.dot_product_attention` (the same float32
logits and softmax). All train steps are bench_train.py's real step (same shapes, optimizer,
donation), compiled in this process; each variant is put in the model while its step is
traced. Timed blocks alternate; each row prints the median block's ms/step and the speedups.
"""

import contextlib
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402
from gpt_jax import model  # noqa: E402


def jnp_einsum_attention(q, k, v, mask, causal=False):
  """model.masked_attention as it was before its products went through gpt_jax.backends.cpu.products.einsum:
  the same two einsums by jnp.einsum, float32 sums asked for in the logits only, so that in
  bf16 the second product sums in bf16 and the logits' gradients are float32 products."""
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  if kv_heads == heads:
    scores, weighted = 'btnd,bsnd->bnts', 'bnts,bsnd->btnd'
  else:
    scores, weighted = 'btkgd,bskd->bkgts', 'bkgts,bskd->btkgd'
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    mask = mask[:, :, None]
  logits = jnp.einsum(scores, q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits * d ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(weighted, probs, v).reshape(b, t, heads, d)


def attention(form):
  """What Attention calls while a step is traced."""
  return lambda: mock.patch.object(model, 'masked_attention', form)


masked_attention = model.masked_attention
OURS = 'masked_attention'
VARIANTS = {
    OURS: contextlib.nullcontext,
    'whole logits': attention(lambda q, k, v, mask, causal=False: masked_attention(q, k, v, mask)),
    'jnp.einsum': attention(jnp_einsum_attention),
    'jax.nn': attention(lambda q, k, v, mask, causal=False:
                        jax.nn.dot_product_attention(q, k, v, mask=mask)),
}


if __name__ == '__main__':
  bench_train.compare_in_step(__doc__.split('\n')[0], VARIANTS, OURS)
