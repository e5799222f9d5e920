"""Weight-only int8 for serving and sampling: per-output-channel scales, float activations.

Each projection kernel (query, key, value, out, fc_in, fc_gate, fc_out, lm_head) and the token
embedding become an `Int8` leaf: int8 values and one float32 scale per output channel
(scale = max |w| / 127 over the kernel's input axes; for the embedding, per vocabulary row, which
is the output channel of the tied logits projection). Biases, norms and learned positions stay
float32. Parameter memory is about 4x smaller than float32.

The model is unchanged: a jitted program calls `dequantize(params)` before `Transformer.apply`,
so the int8 values and the scales are what the program reads from memory, and XLA decides how
the int8 -> float conversion meets the matmul (experiments/bench_serve/README.md measures it).

  cfg, params, _ = checkpoint.load_model(workdir)
  params = quantize.quantize_params(params)             # what --quantize=int8 does
  generator = quantize.generator(cfg, params)           # a decode.Generator over int8 weights
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import decode
from gpt_jax.errors import ConfigError
from gpt_jax.model import PROJECTION_INPUT_AXES, ModelConfig

MODES = ('none', 'int8')


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


def quantize_tensor(w, input_axes: tuple[int, ...]) -> Int8:
  """Symmetric int8 with one scale per index of the axes not in `input_axes`."""
  w = np.asarray(jax.device_get(w), np.float32)
  scale = np.max(np.abs(w), axis=input_axes, keepdims=True) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return Int8(jnp.asarray(values), jnp.asarray(scale))


def quantize_params(params) -> dict:
  """The parameter tree with projection kernels and the token embedding as `Int8` leaves."""
  def walk(tree, path):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = walk(value, path + (key,))
      elif key == 'kernel' and path and path[-1] in PROJECTION_INPUT_AXES:
        out[key] = quantize_tensor(value, tuple(range(PROJECTION_INPUT_AXES[path[-1]])))
      elif key == 'embedding' and path and path[-1] == 'wte':
        out[key] = quantize_tensor(value, (1,))  # one scale per vocabulary row
      else:
        out[key] = value
    return out
  return walk(dict(params), ())


def is_quantized(params) -> bool:
  return any(isinstance(x, Int8) for x in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8)))


def dequantize(params, dtype=jnp.float32):
  """Float parameters for `Transformer.apply`; call it inside the jitted program."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, Int8) else x, params,
                      is_leaf=lambda x: isinstance(x, Int8))


def param_bytes(params) -> int:
  """Bytes the parameters occupy (int8 values and their scales counted for `Int8` leaves)."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8))
  return sum(x.nbytes for x in leaves)


def apply(params, mode: str):
  """params quantized as `mode` ('none' or 'int8'), or ConfigError for an unknown mode."""
  if mode not in MODES:
    raise ConfigError(f'--quantize must be one of {list(MODES)}, got {mode!r}')
  return quantize_params(params) if mode == 'int8' else params


class _Dequantizing:
  """A model whose `apply` dequantizes the parameters first (inside the caller's jit)."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables, params=dequantize(variables['params']))
    return self.model.apply(variables, *args, **kwargs)


def generator(cfg: ModelConfig, params, num_tokens: int | None = None,
              output_major: bool | None = None, placement=None) -> decode.Generator:
  """A decode.Generator for float or `quantize_params` parameters (sample, chat and eval use)."""
  gen = decode.Generator(cfg, params, num_tokens, output_major, placement)
  if is_quantized(params):
    gen.model = _Dequantizing(gen.model)
  return gen
