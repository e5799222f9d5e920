"""Projection kernels stored output-major ([out, in]) for decoding on CPU.

A decoding step multiplies a few rows of activations by every kernel. XLA:CPU runs that product
about twice as fast with the kernel stored [out, in] as the left operand (kernel @ x^T) as with
the trained layout [in..., out...] on the right (x @ kernel): 12 GPT-2 MLPs at 8 rows took 14-16
against 22-31 ms (experiments/bench_decode/README.md). The trained layout stays what checkpoints
and training use; decoding programs transpose each kernel once:

  params = decode_layout.to_output_major(params)       # kernels [out, in]
  with decode_layout.output_major_projections():        # while tracing
    logits, cache = Transformer(cfg).apply({'params': params}, tokens, positions, cache)

Int8 kernels (gpt_jax/inference/quantize.py) are transposed with their scales, so `quantize.dequantize`
yields [out, in] kernels too; `DynamicInt8` kernels are left to quantize's int8 products.
"""

import contextlib
import math

import flax.linen as nn
import jax.numpy as jnp

from gpt_jax.backends.cpu.products import FEW_ROWS, few_rows_product
from gpt_jax.model import PROJECTION_INPUT_AXES, Projection


def _transpose(kernel, num_inputs: int):
  if hasattr(kernel, 'scale'):  # a quantize.Int8: values [in..., out...], scale [1..., out...]
    return type(kernel)(_transpose(kernel.values, num_inputs),
                        kernel.scale.reshape(1, -1).T)
  fan_in = math.prod(kernel.shape[:num_inputs])
  return jnp.asarray(kernel).reshape(fan_in, -1).T.copy()


def to_output_major(params) -> dict:
  """The parameter tree with every projection kernel as a 2-D [out, in] array (its output axes
  flattened in order, likewise its input axes). Other parameters are unchanged."""
  def walk(tree, name):
    return {key: walk(value, key) if isinstance(value, dict) else
            _transpose(value, PROJECTION_INPUT_AXES[name])
            if key == 'kernel' and name in PROJECTION_INPUT_AXES else value
            for key, value in tree.items()}
  return walk(dict(params), '')


def _project_output_major(next_fun, args, kwargs, context):
  """Projection.__call__ for a kernel stored [out, in]; any other method runs unchanged."""
  module = context.module
  # The same projections, by name, as `to_output_major` transposes.
  if (not isinstance(module, Projection) or context.method_name != '__call__'
      or module.name not in PROJECTION_INPUT_AXES):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable('params', 'kernel')
  if not hasattr(kernel, 'dtype'):  # not an array: quantize.apply_model's int8 products
    return next_fun(*args, **kwargs)
  x = args[0]
  num_inputs = module.num_inputs
  batch_shape = x.shape[:x.ndim - num_inputs]
  rows = math.prod(batch_shape)
  x = x.reshape(rows, -1).astype(module.dtype)
  kernel = kernel.astype(module.dtype)
  out_dtype = module.out_dtype or module.dtype
  if rows <= FEW_ROWS:  # the kernel-left form pays only for a handful of rows
    y = few_rows_product(kernel, x, module.dtype, out_dtype)
  else:
    y = jnp.einsum('mk,nk->mn', x, kernel, preferred_element_type=jnp.float32).astype(out_dtype)
  y = y.reshape(batch_shape + tuple(module.shape[num_inputs:]))
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(module.dtype)
  return y


def output_major_projections(active: bool = True) -> contextlib.AbstractContextManager:
  """While active, the model's projections read kernels made by `to_output_major`; with
  active=False, nothing changes (the trained layout)."""
  return nn.intercept_methods(_project_output_major) if active else contextlib.nullcontext()
