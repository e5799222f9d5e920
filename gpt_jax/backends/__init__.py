"""Platform-specific code behind one seam, chosen from the target: the platform of the devices a
program is traced for (gpt_jax/target.py), never the host's.

The default path is what TPU and GPU compilers take as it is: projections as `jnp.matmul` /
`jnp.einsum` with float32 sums (`preferred_element_type`) and autodiff's gradients, GELU from
`jax.nn`, no compiler options. For a CPU mesh the same functions return the forms in
`backends/cpu/`, which keep XLA:CPU on its fast paths; each was measured against the plain form
(experiments/benchmarks/README.md). Attention kernels are chosen the same way in
gpt_jax/kernels.
"""

import contextlib

import jax
import jax.numpy as jnp

from gpt_jax import target
from gpt_jax.backends.cpu import gelu as cpu_gelu
from gpt_jax.backends.cpu import products as cpu_products

Array = jax.Array


def matmul(x: Array, w: Array, dtype, w_transposed: bool = False, out_dtype=None) -> Array:
  """x [n, k] @ w [k, m] (or @ w.T for w [m, k] when `w_transposed`) -> [n, m]: operands cast
  to `dtype`, summed in float32, returned in `out_dtype` (by default `dtype`); the gradient of
  `w` comes back in w's dtype. A quantized `w` (DynamicInt8 of gpt_jax/inference/quantize.py,
  which knows its own layout) computes the product itself."""
  if not hasattr(w, 'dtype'):  # not an array
    return w.matmul(x, out_dtype or dtype)
  if target.is_cpu():
    return cpu_products.matmul(x, w, dtype, w_transposed, out_dtype)
  dtype = jnp.dtype(dtype)
  return jnp.matmul(x.astype(dtype), (w.T if w_transposed else w).astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype or dtype)


def einsum(spec: str, a: Array, b: Array, dtype, out_dtype=None) -> Array:
  """jnp.einsum(spec, a, b) with operands in `dtype`, summed in float32, returned in `out_dtype`
  (or `dtype`)."""
  if target.is_cpu():
    return cpu_products.einsum(spec, a, b, dtype, out_dtype)
  dtype = jnp.dtype(dtype)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype or dtype)


def int8_matmul(x: Array, w: Array, w_transposed: bool = False) -> Array:
  """int8 x [n, k] @ int8 w [k, m] (or @ w.T for w [m, k] when `w_transposed`) -> int32 [n, m],
  summed in int32 (the integer units of TPUs, GPUs, and CPUs with AVX-512 VNNI)."""
  if target.is_cpu():
    return cpu_products.int8_matmul(x, w, w_transposed)
  return jax.lax.dot_general(x, w, (((1,), (1 if w_transposed else 0,)), ((), ())),
                             preferred_element_type=jnp.int32)


def add_bias(y: Array, bias: Array) -> Array:
  """y [n, m] + bias [m] in y's dtype."""
  if target.is_cpu():
    return cpu_products.add_bias(y, bias)
  return y + bias.astype(y.dtype)


def gelu(x: Array) -> Array:
  """GPT-2's GELU, jax.nn.gelu(x, approximate=True), in x's dtype."""
  if target.is_cpu():
    return cpu_gelu.gelu(x)
  return jax.nn.gelu(x, approximate=True)


def cache_compiler_options() -> dict:
  """XLA options for programs that update a KV cache (backends/cpu/compiler_options.py)."""
  if target.is_cpu():
    from gpt_jax.backends.cpu import compiler_options  # pylint: disable=import-outside-toplevel
    return compiler_options.CACHE_UPDATES
  return {}


def run_once_compiler_options() -> dict:
  """XLA options for a program that runs once (initialisation)."""
  if target.is_cpu():
    from gpt_jax.backends.cpu import compiler_options  # pylint: disable=import-outside-toplevel
    return compiler_options.RUN_ONCE
  return {}


def output_major_decoding(num_devices: int) -> bool:
  """Whether decoding programs hold projection kernels [out, in] (backends/cpu/decode_layout.py):
  on one CPU device only; accelerator compilers choose a kernel's layout in memory themselves."""
  return target.is_cpu() and num_devices == 1


def to_output_major(params) -> dict:
  from gpt_jax.backends.cpu import decode_layout  # pylint: disable=import-outside-toplevel
  return decode_layout.to_output_major(params)


def output_major_projections(active: bool) -> contextlib.AbstractContextManager:
  """While active, the model's projections read kernels made by `to_output_major`."""
  if not active:
    return contextlib.nullcontext()
  from gpt_jax.backends.cpu import decode_layout  # pylint: disable=import-outside-toplevel
  return decode_layout.output_major_projections()
