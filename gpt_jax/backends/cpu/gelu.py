"""GPT-2's GELU with a gradient that is one elementwise pass over its input.

Differentiated as written, the tanh GELU keeps several [tokens, mlp] intermediates from the
forward pass for the backward one, and in a low-precision compute dtype rounds each of them
to it. `gelu` keeps only its input and computes the derivative from it in float32, in one
fused pass; values are computed in float32 and returned in the input's dtype. bf16 train steps
ran 1.05-1.11x as fast at the baby and 10m shapes, 1.00-1.02x at 124M; float32 ones as fast as
before (experiments/benchmarks/README.md).

That form is for XLA:CPU: gpt_jax.backends calls it for CPU meshes only; compiled for a TPU or
a GPU, GELU is `jax.nn.gelu(x, approximate=True)`, differentiated as written.
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_CUBIC = 0.044715


def _tanh_of_inner(x: Array) -> Array:
  return jnp.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x))


def gelu(x: Array) -> Array:
  """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as jax.nn.gelu(x, approximate=True)."""
  return _gelu_one_pass_gradient(x)


@jax.custom_vjp
def _gelu_one_pass_gradient(x: Array) -> Array:
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1 + _tanh_of_inner(x32))).astype(x.dtype)


def _gelu_forward(x):
  return _gelu_one_pass_gradient(x), x


def _gelu_backward(x, dy):
  x32 = x.astype(jnp.float32)
  t = _tanh_of_inner(x32)
  slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * x32 * x32)
  return ((dy.astype(jnp.float32) * slope).astype(dy.dtype),)


_gelu_one_pass_gradient.defvjp(_gelu_forward, _gelu_backward)
