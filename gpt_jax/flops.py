"""Analytic FLOP counts and a measured matmul peak, for MFU (model FLOPs utilisation)."""

import time

import jax
import jax.numpy as jnp

from gpt_jax.model import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Matmul FLOPs of one token's forward pass (2 per multiply-add), attention counted in full."""
  e, d, m = cfg.emb_dim, cfg.head_dim, cfg.mlp_dim
  qkvo = 2 * e * d * (2 * cfg.num_heads + 2 * cfg.kv_heads)
  mlp = 2 * e * m * (3 if cfg.mlp == 'swiglu' else 2)
  attention = 2 * 2 * seq_len * cfg.num_heads * d  # q·k and weights·v (PaLM's convention)
  lm_head = 2 * e * cfg.vocab_size
  return cfg.num_layers * (qkvo + mlp + attention) + lm_head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward: the backward pass costs twice the forward."""
  return 3 * forward_flops_per_token(cfg, seq_len)


def measure_matmul_peak(dtype: str = 'float32', size: int | None = None,
                        seconds: float = 0.5) -> float:
  """FLOP/s of a large square matmul on the first device, in `dtype` with float32 accumulation."""
  platform = jax.devices()[0].platform
  size = size or (1024 if platform == 'cpu' else 8192)
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, a).block_until_ready()  # compile
  reps, start = 0, time.perf_counter()
  while True:
    out = matmul(a, a)
    reps += 1
    if reps % 4 == 0:
      out.block_until_ready()
      elapsed = time.perf_counter() - start
      if elapsed > seconds:
        return 2 * size ** 3 * reps / elapsed
