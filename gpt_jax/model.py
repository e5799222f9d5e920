"""A decoder-only Transformer (GPT) in Flax linen.

The GPT-2 layout (learned positions, pre-LayerNorm with bias, GELU MLP, tied embeddings) and the
Llama layout (RoPE, RMSNorm, SwiGLU, grouped-query attention) are both points in `ModelConfig`.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `position`, `norm`); activations are constrained with `act_*` names at block boundaries.
`gpt_jax/sharding.py` maps these names to mesh axes; this file never names a mesh axis.

The forward pass is pure: `Transformer(cfg).apply({'params': params}, tokens, ...)`. For decoding,
an explicit KV cache (see `init_cache`) goes in and the updated cache comes out. Packed sequences
pass `segment_ids` (attention stays within a segment) and per-segment `positions`.

LoRA (`LoraConfig`, rank > 0) adds a low-rank update scale * x A B beside each target projection,
as parameters `<name>_lora_a` / `<name>_lora_b` next to it (B starts at zero, so an adapted model
starts equal to its base); `gpt_jax/lora.py` splits, trains and merges them.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn
from gpt_jax import kernels, target
from gpt_jax.errors import ConfigError
from gpt_jax.backends import add_bias, einsum, gelu, matmul

Array = jax.Array
# One layer's KV cache: {'k': [batch, kv_heads, max_len, head_dim], 'v': same}. Each head's slots
# are contiguous, as attention reads them (experiments/bench_decode measured the other order).
LayerCache = dict[str, Array]
CACHE_AXES = ('batch', 'act_kv_heads', None, 'head_dim')  # sharded like the activations


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Field names equal the keys of `config.model`."""
  vocab_size: int = 256          # rows of the token embedding (>= tokenizer vocabulary)
  max_len: int = 256             # longest sequence (positions / KV cache length)
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0          # grouped-query attention; 0 means num_heads (plain multi-head)
  emb_dim: int = 128
  head_dim: int = 0              # features per attention head; 0 means emb_dim // num_heads
                                 # (set when heads * head_dim != emb_dim, e.g. after pruning)
  mlp_dim: int = 512
  position: str = 'learned'      # 'learned' (GPT-2) | 'rope'
  rope_theta: float = 10_000.0
  rope_scaling: str = 'none'     # 'none' | 'llama3' (Llama 3.1's frequencies for long contexts:
  rope_scaling_factor: float = 8.0    # wavelengths over rope_original_max_len / low_freq_factor
  rope_low_freq_factor: float = 1.0   # are stretched by this factor, those under
  rope_high_freq_factor: float = 4.0  # rope_original_max_len / high_freq_factor kept, and those
  rope_original_max_len: int = 8192   # between blended; the context pretrained at)
  norm: str = 'layernorm'        # 'layernorm' | 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = 'gelu'              # 'gelu' (tanh approximation, as GPT-2) | 'swiglu'
  use_bias: bool = True          # biases in Dense layers (and LayerNorm)
  qkv_bias: bool = False         # biases in the query, key and value projections (Qwen2), also
                                 # where use_bias is False
  tie_embeddings: bool = True    # output projection = token embedding transposed
  qk_norm: bool = False          # RMSNorm of each head's query and key (before RoPE)
  dropout: float = 0.0
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'  # matmul inputs and outputs, activations
  residual_dtype: str = 'float32'  # the residual stream between blocks (and what full remat
                                   # keeps of each block); 'bfloat16' halves that, as MaxText's
                                   # bf16 activations do
  attention: str = 'auto'        # 'auto' | 'xla' | 'splash' | 'cudnn' (gpt_jax/kernels)
  splash_block_q: int = 512      # splash attention's blocks (capped at the sequence length)
  splash_block_kv: int = 512
  splash_block_kv_compute: int = 512
  remat: str = 'none'            # backward pass: 'none' | 'full' (recompute each block) |
                                 # 'dots_saveable' (keep every matmul output, attention's
                                 # [b, h, t, t] logits included, recompute the rest) |
                                 # 'projections' (keep the projections' and the head's outputs,
                                 # not attention's logits or probabilities)
  loss_chunk: int = 0            # training and evaluation losses: the output head and the
                                 # cross-entropy run over this many positions at a time, so
                                 # float32 logits [batch, chunk, vocab] exist instead of
                                 # [batch, length, vocab] (0: all positions at once)
  scan_layers: bool = False      # one nn.scan over the blocks: compile time independent of depth
  scan_unroll: int = 1           # blocks per scan iteration (num_layers: straight-line code over
                                 # the stacked parameters)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def __post_init__(self):
    if not self.head_dim and self.num_heads > 0:  # resolved here, so cfg.head_dim is the width
      object.__setattr__(self, 'head_dim', self.emb_dim // self.num_heads)

  @classmethod
  def from_config(cls, model_config) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    given = dict(model_config)
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ConfigError(f'Unknown config.model fields: {unknown}; known: {sorted(fields)}')
    return cls(**given)


# ModelConfig fields that decide the parameters' shapes and layout (checkpoint compatibility,
# parameter counts).
PARAMETER_FIELDS = ('vocab_size', 'max_len', 'num_layers', 'num_heads', 'num_kv_heads',
                    'emb_dim', 'head_dim', 'mlp_dim', 'position', 'norm', 'mlp', 'use_bias',
                    'qkv_bias', 'tie_embeddings', 'qk_norm', 'param_dtype')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters. Field names equal the keys of `config.lora`; rank 0 means none."""
  rank: int = 0
  alpha: float = 16.0            # the update is scaled by alpha / rank
  dropout: float = 0.0           # on the adapter's input
  targets: tuple[str, ...] = ('query', 'key', 'value', 'out')  # also: fc_in, fc_gate, fc_out

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapts(self, name: str) -> bool:
    return self.rank > 0 and name in self.targets


LORA_TARGETS = ('query', 'key', 'value', 'out', 'fc_in', 'fc_gate', 'fc_out')
# Projection name -> number of leading input axes of its kernel (the rest are output axes).
PROJECTION_INPUT_AXES = {'query': 1, 'key': 1, 'value': 1, 'out': 2, 'fc_in': 1, 'fc_gate': 1,
                         'fc_out': 1, 'lm_head': 1}
NO_LORA = LoraConfig()


def _constrain(x: Array, names: tuple[str, ...]) -> Array:
  """Shards an activation by logical names; a name without a rule is an error."""
  return nn.with_logical_constraint(x, names, fallback=nn.spmd.RulesFallback.RAISE_ERROR)


def _init(stddev: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


class Projection(nn.Module):
  """y = x @ kernel + bias, contracting x's last `num_inputs` axes with the kernel's first ones.

  The kernel keeps its logical shape (e.g. [embed, heads, head_dim]) and the product runs as
  one 2-D matmul, [tokens, fan_in] @ [fan_in, fan_out], in the form gpt_jax.backends gives the
  target (the multi-axis einsum form compiled to slower products;
  experiments/benchmarks/README.md).
  """
  shape: tuple[int, ...]
  num_inputs: int
  use_bias: bool
  dtype: Any
  param_dtype: Any
  kernel_init: Any
  bias_init: Any
  out_dtype: Any = None  # by default `dtype`

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init, self.shape, self.param_dtype)
    fan_in = math.prod(self.shape[:self.num_inputs])
    batch_shape = x.shape[:x.ndim - self.num_inputs]
    y = matmul(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1), self.dtype,
               out_dtype=self.out_dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, self.shape[self.num_inputs:], self.param_dtype)
      y = add_bias(y, bias.reshape(-1))
    return y.reshape(batch_shape + self.shape[self.num_inputs:])


def _dense(shape: tuple[int, ...], num_inputs: int, names: tuple[str, ...], cfg: ModelConfig,
           stddev: float = 0.02, name: str | None = None, use_bias: bool | None = None,
           out_dtype: Any = None) -> Projection:
  """A projection whose kernel of `shape` has logical axes `names` (inputs, then outputs)."""
  return Projection(
      shape=shape, num_inputs=num_inputs,
      use_bias=cfg.use_bias if use_bias is None else use_bias,
      dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=_init(stddev, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[num_inputs:]),
      out_dtype=out_dtype, name=name)


def _project(module: nn.Module, x: Array, einsum_str: str, shape: tuple[int, ...],
             names: tuple[str, ...], name: str, lora: LoraConfig, deterministic: bool,
             stddev: float = 0.02, use_bias: bool | None = None) -> Array:
  """`_dense(...)(x)` named `name` inside `module`, plus its LoRA update when `name` is a target.

  Kernels are laid out input axes first, then output axes; A takes the input axes to the rank,
  B the rank to the output axes.
  """
  cfg = module.cfg
  x_axes, kernel_axes = einsum_str.split('->')[0].split(',')
  y_axes = einsum_str.split('->')[1]
  n_in = sum(axis in x_axes for axis in kernel_axes)
  y = _dense(shape, n_in, names, cfg, stddev=stddev, name=name, use_bias=use_bias)(x)
  if not lora.adapts(name):
    return y
  in_axes, out_axes = kernel_axes[:n_in], kernel_axes[n_in:]
  dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
  fan_in = 1
  for size in shape[:n_in]:
    fan_in *= size
  a = module.param(f'{name}_lora_a', _init(fan_in ** -0.5, names[:n_in] + ('lora_rank',)),
                   shape[:n_in] + (lora.rank,), param_dtype)
  b = module.param(f'{name}_lora_b', nn.with_logical_partitioning(
      nn.initializers.zeros, ('lora_rank',) + names[n_in:]), (lora.rank,) + shape[n_in:],
                   param_dtype)
  x = nn.Dropout(lora.dropout)(x, deterministic=deterministic)
  batch_axes = x_axes.replace(in_axes, '')
  low_rank = jnp.einsum(f'{x_axes},{in_axes}r->{batch_axes}r', x.astype(dtype), a.astype(dtype))
  update = jnp.einsum(f'{batch_axes}r,r{out_axes}->{y_axes}', low_rank, b.astype(dtype))
  return y + lora.scale * update


def make_norm(cfg: ModelConfig, name: str, rms: bool = False) -> nn.Module:
  """The configured norm (`rms`: RMSNorm whatever cfg.norm says) over the last axis."""
  kwargs = dict(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.compute_dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)))
  if cfg.norm == 'layernorm' and not rms:
    return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=nn.with_logical_partitioning(
        nn.initializers.zeros, ('norm',)), **kwargs)
  return nn.RMSNorm(**kwargs)


def rope_frequencies(cfg: ModelConfig) -> Array:
  """The rotary angle per position of each pair of dimensions: [head_dim // 2], float32."""
  half = cfg.head_dim // 2
  freqs = 1.0 / cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling != 'llama3':
    return freqs
  # Llama 3.1: long wavelengths (low frequencies) slowed down by the factor, short ones kept,
  # those between blended (transformers' _compute_llama3_parameters).
  factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * math.pi / freqs
  scaled = jnp.where(wavelen > old_len / low, freqs / factor, freqs)
  smooth = (old_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, blended, scaled)


def apply_rope(x: Array, positions: Array, freqs: Array) -> Array:
  """Rotary embedding (rotate-half convention, as Llama). x: [b, t, h, d], positions: [b, t],
  freqs: [d // 2] (rope_frequencies)."""
  angles = positions[..., None].astype(jnp.float32) * freqs  # [b, t, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_cache(cache: Array, new: Array, positions: Array) -> Array:
  """One layer's cache [b, kv_heads, slots, d] with new [b, t, kv_heads, d] written at
  `positions` [b, t] (consecutive within a row, below the cache length)."""
  if cache.shape[0] == 1:
    # One row: a dynamic_update_slice, which compilers update in place (a one-row scatter can
    # become a bounds-guarded select over a slice of the old cache).
    return jax.lax.dynamic_update_slice(cache, new.transpose(0, 2, 1, 3).astype(cache.dtype),
                                        (0, 0, positions[0, 0], 0))
  rows = jnp.arange(cache.shape[0])[:, None]
  return cache.at[rows, :, positions].set(new.astype(cache.dtype))


def cached_attention(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array,
                     positions: Array) -> Array:
  """Attention of q [b, t, heads, d] at `positions` [b, t] (consecutive within a row) over the
  cache's earlier slots cache_k, cache_v [b, kv_heads, slots, d] and, causally, the new k, v
  [b, t, kv_heads, d]. Query head i reads kv head i // (heads / kv_heads), as
  jax.nn.dot_product_attention.

  The cache is read as it was before this call's keys and values are written, so that the old
  and the new cache need not be alive at once (when attention read the updated cache, each
  layer's cache was copied several times per decoded token; experiments/bench_decode).
  """
  b, t, heads, d = q.shape
  kv_heads, slots = cache_k.shape[1], cache_k.shape[2]
  q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
  scale = d ** -0.5
  old = jnp.einsum('btkgd,bksd->bkgts', q, cache_k, preferred_element_type=jnp.float32) * scale
  new = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  # Slots from the row's first new position on are stale (or about to be overwritten).
  old_mask = jnp.arange(slots)[None, :] < positions[:, :1]
  new_mask = positions[:, None, :] <= positions[:, :, None]
  scores = jnp.concatenate([
      jnp.where(old_mask[:, None, None, None, :], old, jnp.finfo(jnp.float32).min),
      jnp.where(new_mask[:, None, None], new, jnp.finfo(jnp.float32).min)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # probs on the left, so the product comes out [b, kv_heads, g, t, d]: at t == 1 already the
  # [b, t, heads, d] order the output projection reads.
  y = jax.lax.dot_general(probs[..., :slots], cache_v, (((4,), (2,)), ((0, 1), (0, 1))))
  y = y + jnp.einsum('bkgts,bskd->bkgtd', probs[..., slots:], v)
  return y.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def masked_attention(q: Array, k: Array, v: Array, mask: Array, causal: bool = False) -> Array:
  """Softmax attention of q [b, t, heads, d] over k, v [b, s, kv_heads, d] where mask
  [b, 1, t, s] is true; query head i reads kv head i // (heads / kv_heads). The same as
  `jax.nn.dot_product_attention(q, k, v, mask=mask)` (float32 logits and softmax), written as
  two einsums over [b, heads, t, s] logits through gpt_jax.backends
  (experiments/benchmarks/README.md).

  causal: the mask is false wherever the key comes after the query (s > t). Then the first half
  of the queries is computed over the first half of the keys only, skipping the quarter of the
  logits that the mask would discard (train steps at context 256: 1.01-1.09x as fast).
  """
  t = q.shape[1]
  if causal and t == k.shape[1] and t % 2 == 0:
    half = t // 2
    return jnp.concatenate(
        [_masked_attention(q[:, :half], k[:, :half], v[:, :half], mask[:, :, :half, :half]),
         _masked_attention(q[:, half:], k, v, mask[:, :, half:])], axis=1)
  return _masked_attention(q, k, v, mask)


def _masked_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  if kv_heads == heads:  # no group axis of size one
    scores, weighted = 'btnd,bsnd->bnts', 'bnts,bsnd->btnd'
  else:  # query heads grouped over their kv head
    scores, weighted = 'btkgd,bskd->bkgts', 'bkgts,bskd->btkgd'
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    mask = mask[:, :, None]
  logits = einsum(scores, q, k, q.dtype, jnp.float32)
  logits = jnp.where(mask, logits * d ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return einsum(weighted, probs, v, v.dtype).reshape(b, t, heads, d)


def causal_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, positions: Array,
                     segment_ids: Array | None) -> Array:
  """Causal attention of q [b, t, heads, d] over k, v [b, t, kv_heads, d] with the
  implementation cfg.attention names for the target's platform (gpt_jax/kernels): a token
  attends to no later token, nor to another segment when segment_ids are given. The kernels
  order by index; `xla` also masks later positions, which packed batches order the same way."""
  platform = target.platform()
  implementation = kernels.attention_for(cfg.attention, platform)
  if implementation == 'splash':
    # Imported when used: Pallas takes a tenth of a second to import.
    from gpt_jax.kernels import splash_attention  # pylint: disable=import-outside-toplevel
    mesh = jax.sharding.get_abstract_mesh()
    return splash_attention.splash_attention(
        q, k, v, segment_ids, mesh=None if mesh.empty else mesh, block_q=cfg.splash_block_q,
        block_kv=cfg.splash_block_kv, block_kv_compute=cfg.splash_block_kv_compute,
        interpret=platform != 'tpu')
  if implementation == 'cudnn' and segment_ids is None:  # cuDNN's causal mask, in the kernel
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  t = positions.shape[1]
  mask = ((positions[:, None, :, None] >= positions[:, None, None, :])
          & (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]))
  if segment_ids is not None:  # packed sequences: attend within one's own segment only
    mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='cudnn')
  return masked_attention(q, k, v, mask, causal=True)


class Attention(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig = NO_LORA

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache: LayerCache | None, deterministic: bool):
    cfg, lora = self.cfg, self.lora
    out_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # GPT-2's scaled init of residual projections
    e, d = cfg.emb_dim, cfg.head_dim
    # Projections output the compute dtype (matmul units accumulate in float32 inside), so that
    # their gradients are products in the compute dtype too: with float32 outputs, two thirds of
    # a bf16 step's matmuls (the backward ones) took float32 operands.
    q, k, v = (_project(self, x, 'bte,ehd->bthd', (e, heads, d), ('embed', head_name, 'head_dim'),
                        name, lora, deterministic, use_bias=cfg.use_bias or cfg.qkv_bias)
               for name, heads, head_name in (('query', cfg.num_heads, 'heads'),
                                              ('key', cfg.kv_heads, 'kv_heads'),
                                              ('value', cfg.kv_heads, 'kv_heads')))
    if cfg.qk_norm:
      q = make_norm(cfg, 'q_norm', rms=True)(q).astype(q.dtype)
      k = make_norm(cfg, 'k_norm', rms=True)(k).astype(k.dtype)
    if cfg.position == 'rope':
      freqs = rope_frequencies(cfg)
      q, k = apply_rope(q, positions, freqs), apply_rope(k, positions, freqs)
    q = _constrain(q, ('batch', 'length', 'act_heads', 'head_dim'))

    if cache is None:
      # Training / full forward: causal attention over this sequence, in the tokens' order.
      y = causal_attention(cfg, q, k, v, positions, segment_ids)
    else:
      # Decoding: attend to the cache's earlier slots and to this call's keys and values, then
      # write those into their positions' slots.
      y = cached_attention(q, k, v, cache['k'].astype(q.dtype), cache['v'].astype(q.dtype),
                           positions)
      cache = {name: _constrain(write_cache(cache[name], new, positions), CACHE_AXES)
               for name, new in (('k', k), ('v', v))}
    y = _constrain(y, ('batch', 'length', 'act_heads', 'head_dim'))
    y = _project(self, y, 'bthv,hve->bte', (cfg.num_heads, d, e), ('heads', 'head_dim', 'embed'),
                 'out', lora, deterministic, stddev=out_std)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    return y, cache


class Mlp(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig = NO_LORA

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg, lora = self.cfg, self.lora
    out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
    shape, names = (cfg.emb_dim, cfg.mlp_dim), ('embed', 'mlp')
    h = _project(self, x, 'bte,em->btm', shape, names, 'fc_in', lora, deterministic)
    if cfg.mlp == 'swiglu':
      gate = _project(self, x, 'bte,em->btm', shape, names, 'fc_gate', lora, deterministic)
      h = nn.silu(gate) * h
    else:
      h = gelu(h)
    h = _constrain(h, ('batch', 'length', 'act_mlp'))
    y = _project(self, h, 'btm,me->bte', (cfg.mlp_dim, cfg.emb_dim), ('mlp', 'embed'), 'fc_out',
                 lora, deterministic, stddev=out_std)
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True
  lora: LoraConfig = NO_LORA

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache):
    cfg, deterministic = self.cfg, self.deterministic
    y, cache = Attention(cfg, self.lora, name='attn')(make_norm(cfg, 'ln_1')(x), positions,
                                                      segment_ids, cache, deterministic)
    x = x + y.astype(x.dtype)
    x = x + Mlp(cfg, self.lora, name='mlp')(make_norm(cfg, 'ln_2')(x),
                                            deterministic).astype(x.dtype)
    return _constrain(x, ('batch', 'length', 'act_embed')), cache


# Projections are 2-D products and attention's two are batched over (batch, heads):
# 'projections' keeps the products without batch dimensions.
REMAT_POLICIES = {'full': None, 'dots_saveable': jax.checkpoint_policies.dots_saveable,
                  'projections': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Embed(nn.Embed):
  """nn.Embed whose rows are read from the table with its `embed` axis gathered, as a layer
  gathers its kernels. Read from the shards, the partitioner gathered the whole batch's
  activation gradients onto every chip in the backward pass (across slices, in a multi-slice
  mesh)."""

  def __call__(self, inputs: Array) -> Array:
    table = _constrain(jnp.asarray(self.embedding, self.dtype), ('vocab', 'act_embed'))
    return jnp.take(table, inputs, axis=0)


class Transformer(nn.Module):
  """tokens [batch, length] -> (logits [batch, length, vocab] float32, updated cache or None).

  positions default to 0..length-1; segment_ids [batch, length] (packed sequences) restrict
  attention to equal ids. A token attends to no later one in the sequence (nor to a later
  position), whatever the positions. logits_at [batch, n] (indices along length): the logits
  of those tokens only, [batch, n, vocab] (a prefill needs its last token's, and the output
  head is a large product). hidden_only: the final norm's output [batch, length, emb_dim]
  instead of the logits (for `chunked_token_losses`).
  """
  cfg: ModelConfig
  lora: LoraConfig = NO_LORA

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None,
               cache: list[LayerCache] | None = None, deterministic: bool = True,
               segment_ids: Array | None = None, logits_at: Array | None = None,
               hidden_only: bool = False):
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Looked up in the parameters' dtype, then cast to the residual dtype: a
    # bf16 lookup converted the whole table at every step (124M bf16 steps: 1.01-1.03x).
    embed = Embed(cfg.vocab_size, cfg.emb_dim, dtype=jnp.dtype(cfg.param_dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype),
                  embedding_init=_init(0.02, ('vocab', 'embed')), name='wte')
    x = embed(tokens).astype(cfg.residual_dtype)
    if cfg.position == 'learned':
      wpe = self.param('wpe', _init(0.02, ('position', 'embed')), (cfg.max_len, cfg.emb_dim),
                       jnp.dtype(cfg.param_dtype))
      x = x + jnp.take(wpe, positions, axis=0).astype(x.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = _constrain(x, ('batch', 'length', 'act_embed'))

    block_cls = Block
    if cfg.remat != 'none':
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError('Decode with per-layer parameters: see unstack_layers')
      # Parameters get a leading layer axis ('layers' in the sharding rules).
      blocks = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                           'dropout': True},
                       in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                       unroll=cfg.scan_unroll,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = blocks(cfg, deterministic, self.lora, name='blocks')(x, positions, segment_ids,
                                                                  None)
      new_cache = None
    else:
      new_cache = [] if cache is not None else None
      for i in range(cfg.num_layers):
        x, layer_cache = block_cls(cfg, deterministic, self.lora, name=f'block_{i}')(
            x, positions, segment_ids, None if cache is None else cache[i])
        if cache is not None:
          new_cache.append(layer_cache)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
    x = make_norm(cfg, 'ln_f')(x)
    if hidden_only:
      return x, new_cache

    # The head's float32 sums are the logits as they are: rounding them to the compute dtype
    # would lose precision and cost two passes over [tokens, vocab].
    if cfg.tie_embeddings:
      logits = matmul(x.reshape(-1, cfg.emb_dim), embed.embedding, cfg.compute_dtype,
                      w_transposed=True, out_dtype=jnp.float32
                      ).reshape(x.shape[:-1] + (cfg.vocab_size,))
    else:
      logits = _dense((cfg.emb_dim, cfg.vocab_size), 1, ('embed', 'vocab'), cfg, name='lm_head',
                      use_bias=False, out_dtype=jnp.float32)(x)
    logits = _constrain(logits, ('batch', 'length', 'act_vocab'))
    return logits, new_cache


def chunked_token_losses(cfg: ModelConfig, params, hidden: Array, targets: Array,
                         chunk: int) -> Array:
  """Per-token cross-entropy [batch, length] of the output head over `hidden` (the model's
  hidden_only output), `chunk` positions at a time. Each chunk's float32 logits are computed,
  reduced to losses and dropped, and computed again in the backward pass (jax.checkpoint): the
  whole [batch, length, vocab] logits, the largest activation of a large-vocabulary model,
  never exist at once. Equals the losses of the full logits."""
  batch, length, emb = hidden.shape
  if length % chunk:
    raise ConfigError(f'config.model.loss_chunk ({chunk}) must divide the sequence length '
                      f'({length})')
  if cfg.tie_embeddings:
    kernel, transposed = nn.unbox(params['wte']['embedding']), True
  else:
    kernel, transposed = nn.unbox(params['lm_head']['kernel']), False

  @jax.checkpoint
  def losses_of(x, chunk_targets):
    logits = matmul(x.reshape(-1, emb), kernel, cfg.compute_dtype, w_transposed=transposed,
                    out_dtype=jnp.float32).reshape(batch, chunk, cfg.vocab_size)
    logits = _constrain(logits, ('batch', 'length', 'act_vocab'))
    return optax.softmax_cross_entropy_with_integer_labels(logits, chunk_targets)

  chunks = length // chunk
  xs = hidden.reshape(batch, chunks, chunk, emb).swapaxes(0, 1)
  ts = targets.reshape(batch, chunks, chunk).swapaxes(0, 1)
  losses = jax.lax.map(lambda pair: losses_of(*pair), (xs, ts))  # [chunks, batch, chunk]
  return losses.swapaxes(0, 1).reshape(batch, length)


def init_cache(cfg: ModelConfig, batch_size: int, dtype: Any = None) -> list[LayerCache]:
  """An empty KV cache for `batch_size` sequences of up to `cfg.max_len` tokens."""
  shape = (batch_size, cfg.kv_heads, cfg.max_len, cfg.head_dim)
  dtype = jnp.dtype(dtype or cfg.compute_dtype)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_layers)]


def unstack_layers(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """Scanned parameters ('blocks', with a leading layer axis) -> per-layer 'block_i' (for decoding,
  conversion and inspection); other parameters are returned unchanged."""
  if not cfg.scan_layers:
    return cfg, params
  params = dict(params)
  stacked = params.pop('blocks')
  for i in range(cfg.num_layers):
    params[f'block_{i}'] = jax.tree.map(lambda x: x[i], stacked)
  return dataclasses.replace(cfg, scan_layers=False, scan_unroll=1), params


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
