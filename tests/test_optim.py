"""The optimizers of gpt_jax.optim: which parameters Muon orthogonalizes, and how."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import config as config_lib, optim
from gpt_jax.errors import ConfigError


def muon_config():
  config = config_lib.base_config()
  config.optim.name = 'muon'
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.optim.weight_decay = 0.0
  return config.optim


def test_muon_orthogonalizes_attention_kernels_as_embed_by_heads_matrices():
  rng = np.random.default_rng(0)
  query = rng.normal(size=(8, 2, 4)).astype(np.float32)   # (embed, heads, head_dim)
  out = rng.normal(size=(2, 4, 8)).astype(np.float32)     # (heads, head_dim, embed)
  embedding = rng.normal(size=(5, 8)).astype(np.float32)
  params = {'attn': {'query': {'kernel': jnp.zeros((8, 2, 4))},
                     'out': {'kernel': jnp.zeros((2, 4, 8))}},
            'mlp': {'fc_in': {'kernel': jnp.zeros((8, 8))}, 'fc_out': {'kernel': jnp.zeros((8, 8))}},
            'wte': {'embedding': jnp.zeros((5, 8))}, 'ln_f': {'scale': jnp.ones(8)}}
  grads = {'attn': {'query': {'kernel': query}, 'out': {'kernel': out}},
           'mlp': {'fc_in': {'kernel': query.reshape(8, 8)},
                   'fc_out': {'kernel': out.reshape(8, 8)}},
           'wte': {'embedding': embedding}, 'ln_f': {'scale': np.ones(8, np.float32)}}
  tx = optim.make_optimizer(muon_config(), num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # An attention kernel gets exactly the update of the same weights as a 2D matrix.
  np.testing.assert_allclose(updates['attn']['query']['kernel'].reshape(8, 8),
                             updates['mlp']['fc_in']['kernel'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updates['attn']['out']['kernel'].reshape(8, 8),
                             updates['mlp']['fc_out']['kernel'], rtol=1e-5, atol=1e-7)
  # Orthogonalized: the singular values of the update are all about equal (Newton-Schulz
  # leaves them within roughly [0.7, 1.2] of each other), unlike those of the gradient.
  singular = np.linalg.svd(np.asarray(updates['mlp']['fc_in']['kernel']), compute_uv=False)
  assert singular.max() / singular.min() < 2 < np.ptp(np.linalg.svd(query.reshape(8, 8),
                                                                   compute_uv=False))
  # Embeddings and norm scales take AdamW's update instead (Nesterov's, as optax's muon sets
  # it): at step 1, lr * (1 + b1 (1 - b1) / (1 - b1^2)) * sign(gradient).
  config = muon_config()
  lr, b1 = optim.learning_rate_schedule(config, 10)(0), config.b1
  np.testing.assert_allclose(updates['wte']['embedding'],
                             -lr * (1 + b1 * (1 - b1) / (1 - b1**2)) * np.sign(embedding),
                             rtol=1e-4)


def test_muon_dimension_numbers_send_embeddings_head_norms_and_adapters_to_adamw():
  params = {'wte': {'embedding': jnp.zeros((5, 8))}, 'lm_head': {'kernel': jnp.zeros((8, 5))},
            'ln_1': {'scale': jnp.zeros(8)}, 'fc_in': {'kernel': jnp.zeros((8, 16)),
                                                       'bias': jnp.zeros(16)},
            'query': {'kernel': nn.Partitioned(jnp.zeros((3, 8, 2, 4)),
                                               ('layers', 'embed', 'heads', 'head_dim'))},
            'fc_in_lora_a': jnp.zeros((8, 4))}
  specs = optim.muon_dimension_numbers(params)
  assert specs['wte']['embedding'] is None and specs['lm_head']['kernel'] is None
  assert specs['ln_1']['scale'] is None and specs['fc_in']['bias'] is None
  assert specs['fc_in_lora_a'] is None
  assert specs['fc_in']['kernel'] == optim.MuonDimensionNumbers(0, 1)
  # A stacked (scan_layers) kernel: the leading layer axis is a batch axis.
  assert specs['query']['kernel'] == optim.MuonDimensionNumbers(1, (2, 3))


def test_polar_express_runs_its_first_steps_and_orthogonalizes_better_in_five():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(32, 32)))
  v, _ = np.linalg.qr(rng.normal(size=(64, 32)))
  spread = (u * np.geomspace(1, 0.01, 32)) @ v.T  # singular values over two orders of magnitude
  params = {'fc_in': {'kernel': jnp.zeros((32, 64))}}

  def update(gradient, coeffs, steps):
    config = muon_config()
    config.muon_ns_coeffs, config.muon_ns_steps = coeffs, steps
    tx = optim.make_optimizer(config, num_steps=10)
    updates, _ = tx.update({'fc_in': {'kernel': gradient.astype(np.float32)}}, tx.init(params),
                           params)
    return np.asarray(updates['fc_in']['kernel'], np.float64)

  def relative_singular_values(x):
    s = np.linalg.svd(x, compute_uv=False)
    return s / s.max()

  for gradient in (spread, rng.normal(size=(32, 64))):
    # Fewer steps run the schedule's first ones (optax alone would take its last ones).
    x = gradient / np.linalg.norm(gradient)
    for a, b, c in optim.POLAR_EXPRESS_COEFFS[:3]:
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    three = update(gradient, 'polar_express', 3)
    np.testing.assert_allclose(three / np.linalg.norm(three), -x / np.linalg.norm(x), atol=2e-5)
    # All five steps: every singular value within 0.7-1 of the largest, unlike the fixed quintic.
    polar = relative_singular_values(update(gradient, 'polar_express', 5))
    standard = relative_singular_values(update(gradient, 'standard', 5))
    assert polar.min() > 0.7 and polar.min() > standard.min() + 0.1, (polar.min(), standard.min())

  config = config_lib.base_config()
  config.data.tfds_name = 'x'
  config.optim.muon_ns_coeffs, config.optim.muon_ns_steps = 'polar_express', 6
  with pytest.raises(ConfigError, match='muon_ns_steps .6. must be 1 to 5'):
    config_lib.validate(config)
  config.optim.muon_ns_coeffs = 'cubic'
  with pytest.raises(ConfigError, match='optim.muon_ns_coeffs must be one of'):
    config_lib.validate(config)


def test_unknown_optimizer_is_a_config_error():
  config = config_lib.base_config()
  config.optim.name = 'sgd'
  config.data.tfds_name = 'x'
  with pytest.raises(ConfigError, match="optim.name must be one of"):
    config_lib.validate(config)


def test_clipping_by_global_norm_matches_optax_and_takes_the_norm_it_is_given():
  rng = np.random.default_rng(0)
  grads = {'a': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
           'b': jnp.asarray(rng.normal(size=7), jnp.float32)}
  norm = float(optax.tree.norm(grads))
  for max_norm in (norm / 3, norm * 2):  # clipped, and left as it is
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, theirs)
  # Given the norm (as the train step does), it does not compute its own.
  halved, _ = optim.clip_by_global_norm(norm / 3).update(grads, optax.EmptyState(),
                                                          global_norm=2 * norm)
  np.testing.assert_allclose(halved['a'], grads['a'] / 6, rtol=1e-6)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_optimizers_take_the_global_norm_from_the_train_step(name):
  config = muon_config()
  config.name, config.grad_clip = name, 1.0
  params = {'fc_in': {'kernel': jnp.ones((4, 4))}, 'ln_f': {'scale': jnp.ones(4)}}
  grads = jax.tree.map(lambda p: 10 * p, params)  # norm about 45: clipped to 1
  tx = optim.make_optimizer(config, num_steps=10)

  def new_state(**global_norm):
    return jax.tree.leaves(tx.update(grads, tx.init(params), params, **global_norm)[1])

  computed = new_state()
  given = new_state(global_norm=optax.tree.norm(grads))
  assert all(np.allclose(x, y, rtol=1e-6) for x, y in zip(given, computed))
  # A different norm changes the moments: the clipping got the one passed in.
  doubled = new_state(global_norm=2 * optax.tree.norm(grads))
  assert not all(np.allclose(x, y, rtol=1e-3) for x, y in zip(doubled, computed))
