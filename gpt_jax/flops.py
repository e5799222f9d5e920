"""FLOP counts, analytic and of a traced program, and a measured matmul peak, for MFU (model
FLOPs utilisation)."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def measure_matmul_peak(dtype: str = 'float32', device: jax.Device | None = None,
                        size: int | None = None, seconds: float = 0.5) -> float:
  """FLOP/s of a large square matmul on `device` (by default the first local one), in `dtype`
  with float32 accumulation."""
  device = device or jax.local_devices()[0]
  size = size or (1024 if device.platform == 'cpu' else 8192)
  a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32),
                     device).astype(dtype)
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


def step_products(closed_jaxpr) -> list[tuple]:
  """(lhs shape, rhs shape, dtypes, dimension numbers, output dtype) of every dot_general the
  jaxpr runs, once per execution: scan bodies count `length` times, a cond its largest branch."""
  def walk(jaxpr, times) -> list[tuple]:
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        lhs, rhs = (v.aval for v in eqn.invars)
        key = (lhs.shape, rhs.shape, str(lhs.dtype), str(rhs.dtype),
               eqn.params['dimension_numbers'], str(eqn.outvars[0].aval.dtype))
        found += [key] * times
      elif eqn.primitive.name == 'cond':
        found += max((walk(branch.jaxpr, times) for branch in eqn.params['branches']),
                     key=lambda branch: sum(map(product_flops, branch)))
      else:
        repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
        for value in eqn.params.values():
          for sub in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
              found += walk(sub.jaxpr, times * repeat)
            elif isinstance(sub, jax.extend.core.Jaxpr):
              found += walk(sub, times * repeat)
    return found

  return walk(closed_jaxpr.jaxpr, 1)


def product_flops(product) -> int:
  lhs_shape, rhs_shape, _, _, ((_, rhs_contract), (_, rhs_batch)), _ = product
  rhs_free = math.prod(n for d, n in enumerate(rhs_shape) if d not in rhs_contract + rhs_batch)
  return 2 * math.prod(lhs_shape) * rhs_free


def program_flops(closed_jaxpr) -> int:
  """The matrix products' FLOPs of one run of a traced program (jitted.trace(...).jaxpr): what
  the step computes, remat's recomputation included."""
  return sum(map(product_flops, step_products(closed_jaxpr)))
