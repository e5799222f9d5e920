"""experiments/benchmarks/bench_product_bound.py: the products it replays are the step's."""

import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'experiments', 'benchmarks'))
import bench_product_bound  # noqa: E402
import bench_train  # noqa: E402
from gpt_jax import flops  # noqa: E402


def test_scan_bodies_count_per_iteration_and_a_cond_its_largest_branch():
  def f(x, w):
    def body(carry, _):
      return carry @ w, None
    x, _ = jax.lax.scan(body, x, None, length=3)
    return jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)

  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  products = bench_product_bound.step_products(jax.make_jaxpr(f)(x, w))
  assert len(products) == 5
  assert sum(map(bench_product_bound.product_flops, products)) == 5 * 2 * 2 * 4 * 4


def test_einsum_equations_compute_the_dot_generals():
  rng = np.random.default_rng(0)
  cases = [((6, 4), (6, 5), (((0,), (0,)), ((), ()))),            # a weight gradient, x.T @ dy
           ((6, 4), (5, 4), (((1,), (1,)), ((), ()))),            # dy @ w.T
           ((3, 2, 7, 5), (3, 9, 2, 5), (((3,), (3,)), ((0, 1), (0, 2))))]  # attention's logits
  for lhs_shape, rhs_shape, dimension_numbers in cases:
    a = rng.standard_normal(lhs_shape, np.float32)
    b = rng.standard_normal(rhs_shape, np.float32)
    product = (lhs_shape, rhs_shape, 'float32', 'float32', dimension_numbers, 'float32')
    expected = jax.lax.dot_general(a, b, dimension_numbers)
    got = torch.einsum(bench_product_bound.einsum_equation(product), torch.tensor(a),
                       torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert bench_product_bound.product_flops(product) == 2 * expected.size * math.prod(
        lhs_shape[d] for d in dimension_numbers[0][0])


def test_the_train_steps_products_are_the_models_flops():
  """Projections and head: forward, input gradient and weight gradient, exactly 3x the
  analytic count; attention at most the analytic (uncausal) count."""
  layers, heads, emb, ctx, batch, vocab = 2, 2, 64, 32, 4, 96
  ours = bench_train.Ours((layers, heads, emb, ctx, batch, vocab, 1, 1), 'float32', 1)
  with jax.set_mesh(ours.mesh), nn.logical_axis_rules(ours.rules):
    traced = ours.step_jit.trace(ours.state, ours.batches[0], {})
  products = bench_product_bound.step_products(traced.jaxpr)
  two_d = sum(bench_product_bound.product_flops(p) for p in products if len(p[0]) == 2)
  batched = sum(bench_product_bound.product_flops(p) for p in products if len(p[0]) > 2)
  tokens = ctx * batch
  attention = 3 * layers * 2 * 2 * ctx * emb * tokens
  assert two_d == flops.train_flops_per_token(ours.model_cfg, ctx) * tokens - attention
  assert 0.5 * attention <= batched <= attention
