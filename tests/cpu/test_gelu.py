"""activations.gelu: GPT-2's tanh GELU and its recomputed gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.backends.cpu.gelu import gelu


def _inputs(dtype):
  return jnp.linspace(-6.0, 6.0, 2001, dtype=jnp.float32).astype(dtype)


def _exact_gelu_and_slope(x):
  """The tanh GELU and its derivative in float64."""
  x = np.asarray(x, np.float64)
  c = np.sqrt(2 / np.pi)
  t = np.tanh(c * (x + 0.044715 * x ** 3))
  return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x ** 2)


def test_gelu_and_its_gradient_equal_the_differentiated_formula():
  x = _inputs(jnp.float32)
  exact_y, exact_slope = _exact_gelu_and_slope(x)
  np.testing.assert_allclose(gelu(x), exact_y, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-5)
  slope = jax.vmap(jax.grad(gelu))(x)
  np.testing.assert_allclose(slope, exact_slope, rtol=1e-5, atol=1e-5)
  # The slope dips below 0 left of the origin and rises above 1 right of it.
  assert slope.min() < -0.1 and slope.max() > 1.1


def test_bfloat16_gelu_computes_in_float32_and_rounds_once():
  x = _inputs(jnp.bfloat16)
  dy = jnp.ones_like(x)
  y, vjp = jax.vjp(gelu, x)
  (dx,) = vjp(dy)
  assert y.dtype == dx.dtype == jnp.bfloat16
  x32 = x.astype(jnp.float32)
  exact_y, exact_dx = _exact_gelu_and_slope(x32)
  # One rounding of the float32 result: the float32 values rounded to bf16.
  np.testing.assert_array_equal(y, gelu(x32).astype(jnp.bfloat16))
  np.testing.assert_allclose(y.astype(jnp.float32), exact_y, rtol=2 ** -8, atol=1e-5)
  np.testing.assert_allclose(dx.astype(jnp.float32), exact_dx, rtol=2 ** -8, atol=1e-5)
