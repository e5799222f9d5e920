"""The optimizer: AdamW with linear warmup, cosine decay and global-norm clipping, from config.optim."""

import jax
import optax


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


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_config, num_steps)
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip) if optim_config.grad_clip > 0
      else optax.identity(),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay,
                  mask=decay_mask if optim_config.decay_matrices_only else None),
  )
