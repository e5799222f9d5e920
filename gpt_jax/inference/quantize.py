"""int8 weights for serving and sampling: per-output-channel scales, with float activations
(`int8`, weight-only) or with each token's activations quantized as the product runs
(`int8_dynamic`: int8 x int8 products summed in int32).

Each projection kernel (query, key, value, out, fc_in, fc_gate, fc_out, lm_head) and the token
embedding become an `Int8` leaf: int8 values and one float32 scale per output channel
(scale = max |w| / 127 over the kernel's input axes; for the embedding, per vocabulary row, which
is the output channel of the tied logits projection). Biases, norms and learned positions stay
float32. Parameter memory is about 4x smaller than float32.

`int8`: the model is unchanged: a jitted program calls `dequantize(params)` before
`Transformer.apply`, so the int8 values and the scales are what the program reads from memory,
and XLA decides how the int8 -> float conversion meets the matmul (on XLA:CPU a float product
after a conversion, slower than float32: experiments/quantize/README.md).

`int8_dynamic` (AQT's dynamic quantization): projection kernels and the token embedding become
`DynamicInt8` leaves, and each product with one (the projections, and the tied output head)
quantizes its input per token (scale = max |x| / 127 over the token's features), multiplies
int8 by int8 with int32 sums (`backends.int8_matmul`) and scales the sums back by the token's
and the channel's scales; the embedding lookup scales the rows it reads. Parameter memory is
the same as `int8`'s.

  cfg, params, _ = checkpoint.load_model(workdir)
  params = quantize.apply(params, 'int8_dynamic')       # what --quantize=int8_dynamic does
  generator = quantize.generator(cfg, params)           # a decode.Generator over int8 weights
"""

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import backends, decode
from gpt_jax.errors import ConfigError
from gpt_jax.model import PROJECTION_INPUT_AXES, ModelConfig, Projection

MODES = ('none', 'int8', 'int8_dynamic')
MODES_HELP = ('Weights: float as trained; int8 (weight-only, per-channel scales; about 4x less '
              'parameter memory); or int8_dynamic (the same int8 weights, multiplied as int8 by '
              'activations quantized per token, with int32 sums).')


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8:
  """A float tensor stored as int8 values times a float32 scale broadcast over its input axes."""
  values: jax.Array  # int8, the tensor's shape
  scale: jax.Array   # float32, 1 on the input axes, the tensor's size on the output axes

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.scale.nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DynamicInt8(Int8):
  """A kernel multiplied as int8 by activations quantized per token (int8_dynamic).

  Held in the trained layout (scale [1..., out...]) or output-major (values [out, in], scale
  [out, 1]: backends.to_output_major, and the token embedding [vocab, embed], whose output
  channels are its rows)."""

  def matmul(self, x: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """x [n, fan_in] @ this kernel (`dynamic_matmul`); what backends.matmul calls for it."""
    return dynamic_matmul(x, self).astype(out_dtype)


def quantize_tensor(w, input_axes: tuple[int, ...], kind: type = Int8) -> Int8:
  """Symmetric int8 with one scale per index of the axes not in `input_axes`."""
  w = np.asarray(jax.device_get(w), np.float32)
  scale = np.max(np.abs(w), axis=input_axes, keepdims=True) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return kind(jnp.asarray(values), jnp.asarray(scale))


def quantize_params(params, dynamic: bool = False) -> dict:
  """The parameter tree with projection kernels and the token embedding as `Int8` leaves
  (`dynamic`: the projection kernels as `DynamicInt8`)."""
  kernel_kind = DynamicInt8 if dynamic else Int8

  def walk(tree, path):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = walk(value, path + (key,))
      elif key == 'kernel' and path and path[-1] in PROJECTION_INPUT_AXES:
        out[key] = quantize_tensor(value, tuple(range(PROJECTION_INPUT_AXES[path[-1]])),
                                   kernel_kind)
      elif key == 'embedding' and path and path[-1] == 'wte':
        out[key] = quantize_tensor(value, (1,), kernel_kind)  # one scale per vocabulary row
      else:
        out[key] = value
    return out
  return walk(dict(params), ())


def is_quantized(params) -> bool:
  return any(isinstance(x, Int8) for x in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8)))


def dequantize(params, dtype=jnp.float32, keep_dynamic: bool = False):
  """Float parameters for `Transformer.apply`; call it inside the jitted program.
  keep_dynamic: `DynamicInt8` leaves stay int8 (for `apply_model`)."""
  def convert(x):
    if not isinstance(x, Int8) or (keep_dynamic and isinstance(x, DynamicInt8)):
      return x
    return x.dequantize(dtype)
  return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, Int8))


def param_bytes(params) -> int:
  """Bytes the parameters occupy (int8 values and their scales counted for `Int8` leaves)."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8))
  return sum(x.nbytes for x in leaves)


def apply(params, mode: str):
  """params quantized as `mode` (one of MODES), or ConfigError for an unknown mode."""
  if mode not in MODES:
    raise ConfigError(f'--quantize must be one of {list(MODES)}, got {mode!r}')
  if mode == 'none':
    return params
  return quantize_params(params, dynamic=mode == 'int8_dynamic')


# ------------------------------------------------------------------ int8 x int8 products


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [n, k] float -> (int8 [n, k], float32 scale [n, 1]): one symmetric scale per row
  (max |x| / 127; 1 for an all-zero row), so that x ~ values * scale within scale / 2."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def dynamic_matmul(x: jax.Array, kernel: DynamicInt8) -> jax.Array:
  """x [n, fan_in] @ the kernel as a [fan_in, fan_out] matrix -> float32 [n, fan_out]: x
  quantized per row, int8 x int8 summed in int32, scaled back by the row's and the output
  channel's scales. For the kernel held output-major too (values [fan_out, fan_in])."""
  output_major = kernel.scale.shape[0] != 1  # the trained layout's scale is 1 on input axes
  fan_out = kernel.scale.size
  values = kernel.values.reshape(fan_out, -1) if output_major else kernel.values.reshape(
      -1, fan_out)
  x_values, x_scale = quantize_rows(x)
  sums = backends.int8_matmul(x_values, values, w_transposed=output_major)
  return sums.astype(jnp.float32) * x_scale * kernel.scale.reshape(1, fan_out)


def _dynamic_products(next_fun, args, kwargs, context):
  """Projection.__call__ for a `DynamicInt8` kernel, and the embedding lookup for a `DynamicInt8`
  table (the tied head's product goes through backends.matmul); anything else runs unchanged."""
  module = context.module
  if context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.Embed):
    table = module.get_variable('params', 'embedding')
    if not isinstance(table, DynamicInt8):
      return next_fun(*args, **kwargs)
    tokens = args[0]
    rows = jnp.take(table.values, tokens, axis=0).astype(jnp.float32)
    return (rows * jnp.take(table.scale, tokens, axis=0)).astype(module.dtype)
  if not isinstance(module, Projection):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable('params', 'kernel')
  if not isinstance(kernel, DynamicInt8):
    return next_fun(*args, **kwargs)
  x = args[0]
  batch_shape = x.shape[:x.ndim - module.num_inputs]
  y = dynamic_matmul(x.reshape(math.prod(batch_shape), -1), kernel)
  y = y.astype(module.out_dtype or module.dtype)
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').reshape(-1).astype(y.dtype)
  return y.reshape(batch_shape + tuple(module.shape[module.num_inputs:]))


def apply_model(model, params, *args, **kwargs):
  """model.apply({'params': params}, ...) for float, `int8` or `int8_dynamic` parameters; call
  it inside the jitted program (the int8 values are what the program reads)."""
  dynamic = any(isinstance(x, DynamicInt8) for x in
                jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8)))
  context = nn.intercept_methods(_dynamic_products) if dynamic else contextlib.nullcontext()
  with context:
    return model.apply({'params': dequantize(params, keep_dynamic=True)}, *args, **kwargs)


class _Quantized:
  """A model whose `apply` runs `apply_model` (inside the caller's jit)."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, *args, **kwargs):
    return apply_model(self.model, variables['params'], *args, **kwargs)


def generator(cfg: ModelConfig, params, num_tokens: int | None = None,
              output_major: bool | None = None, placement=None) -> decode.Generator:
  """A decode.Generator for float or `quantize_params` parameters (sample, chat and eval use)."""
  gen = decode.Generator(cfg, params, num_tokens, output_major, placement)
  if is_quantized(params):
    gen.model = _Quantized(gen.model)
  return gen
