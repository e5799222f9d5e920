"""Attention implementations, chosen once by config and by the platform of the mesh's devices.

`config.model.attention`:
- `xla`: plain JAX (gpt_jax/model.py `masked_attention`): float32 [batch, heads, t, t] logits,
  memory quadratic in the context; runs everywhere.
- `splash`: the Pallas TPU splash-attention kernel (`splash_attention.py`): logits are never
  materialised; TPU only (Pallas' interpreter runs it elsewhere, for tests).
- `cudnn`: `jax.nn.dot_product_attention(..., implementation='cudnn')`, cuDNN's fused
  attention; NVIDIA GPUs only.
- `auto` (default): splash on TPU, cudnn on GPU, xla on CPU.
"""

from gpt_jax.errors import ConfigError

ATTENTION = ('auto', 'xla', 'splash', 'cudnn')
_RUNS_ON = {'splash': 'tpu', 'cudnn': 'gpu'}


def attention_for(name: str, platform: str) -> str:
  """The implementation `name` stands for on `platform` ('cpu', 'gpu' or 'tpu')."""
  if name == 'auto':
    return {'tpu': 'splash', 'gpu': 'cudnn'}.get(platform, 'xla')
  return name


def check_attention(name: str, platform: str) -> None:
  """A ConfigError when `platform`'s devices cannot run attention `name`."""
  if name not in ATTENTION:
    raise ConfigError(f'config.model.attention must be one of {ATTENTION}, got {name!r}')
  needed = _RUNS_ON.get(attention_for(name, platform))
  if needed and needed != platform:
    raise ConfigError(f'config.model.attention={name!r} runs on {needed.upper()} devices only; '
                      f'the mesh\'s devices are {platform.upper()}: use xla or auto')
