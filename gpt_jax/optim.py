"""The optimizer from config.optim: AdamW, or Muon on the hidden matrices with AdamW on the rest;
linear warmup, cosine decay and global-norm clipping either way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, muon  # MuonDimensionNumbers: for callers too

OPTIMIZERS = ('adamw', 'muon')

# Polar Express (Amsel et al. 2025, arXiv:2505.16932), as in modded-nanogpt: each step's quintic
# is the minimax-optimal one for the singular values the previous steps leave. The schedule is
# built to finish in five steps; its first three are far from orthogonal (the first overshoots
# the large singular values), yet trained the speedrun as well as five fixed-quintic steps.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps`."""
  decay_steps = optim_config.decay_steps or num_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_config.lr,
      warmup_steps=optim_config.warmup_steps,
      decay_steps=max(decay_steps, optim_config.warmup_steps + 1),
      end_value=optim_config.lr * optim_config.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices (Dense kernels, embeddings) only; not on biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_dimension_numbers(params):
  """How Muon sees each hidden matrix as (inputs, outputs): attention kernels keep their head
  axes (query/key/value: embed -> heads x head_dim; out: heads x head_dim -> embed); a leading
  layer axis (scan_layers) is a batch axis. None sends a parameter to AdamW: embeddings, the
  output head, norm scales, biases and LoRA adapters."""
  def spec(path, p):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] != 'kernel' or 'lm_head' in names:
      return None
    p = p.value if isinstance(p, nn.meta.AxisMetadata) else p
    if names[-2] in ('query', 'key', 'value'):
      return MuonDimensionNumbers(reduction_axis=p.ndim - 3, output_axis=(p.ndim - 2, p.ndim - 1))
    if names[-2] == 'out':
      return MuonDimensionNumbers(reduction_axis=(p.ndim - 3, p.ndim - 2), output_axis=p.ndim - 1)
    return MuonDimensionNumbers(reduction_axis=p.ndim - 2, output_axis=p.ndim - 1)
  # Boxed parameters (nn.Partitioned, as train.sharded_state initialises) count as leaves.
  return jax.tree_util.tree_map_with_path(
      spec, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def newton_schulz_coeffs(optim_config):
  """optax.contrib.muon's `ns_coeffs`: one quintic for every step, or one per step."""
  if optim_config.muon_ns_coeffs == 'standard':
    return 'standard'
  # The schedule's first steps: given more coefficients than steps, optax takes the last ones.
  return POLAR_EXPRESS_COEFFS[:optim_config.muon_ns_steps]


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm as one scalar factor, min(1, max_norm / norm), with the norm
  passed in as `global_norm=` when the caller has it (the train step computes it for its metrics
  and its non-finite guard) and computed otherwise. optax's form computes the norm again and
  selects between each gradient and its clipped copy, which XLA:CPU writes to memory for AdamW
  to read beside the gradient: two more passes over every gradient, and a third read."""
  def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    scale = jnp.minimum(1.0, max_norm / norm)  # a zero norm gives inf, so 1
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_config, num_steps)
  if optim_config.name == 'adamw':
    update = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                         weight_decay=optim_config.weight_decay,
                         mask=decay_mask if optim_config.decay_matrices_only else None)
  elif optim_config.name == 'muon':
    # Muon's learning rate follows the same warmup and decay shape as AdamW's.
    muon_config = optim_config.copy_and_resolve_references()
    muon_config.lr = optim_config.muon_lr
    update = muon(learning_rate_schedule(muon_config, num_steps), beta=optim_config.muon_momentum,
                  ns_coeffs=newton_schulz_coeffs(optim_config),
                  ns_steps=optim_config.muon_ns_steps,
                  weight_decay=optim_config.weight_decay,
                  adam_learning_rate=schedule, adam_b1=optim_config.b1, adam_b2=optim_config.b2,
                  adam_weight_decay=optim_config.weight_decay, eps=optim_config.eps,
                  muon_weight_dimension_numbers=muon_dimension_numbers)
  else:
    raise ValueError(f'optim.name={optim_config.name!r}: expected one of {OPTIMIZERS}')
  return optax.chain(
      clip_by_global_norm(optim_config.grad_clip) if optim_config.grad_clip > 0
      else optax.identity(),
      update,
  )
