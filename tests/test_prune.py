"""Structured pruning: nothing pruned changes nothing; a pruned model computes what the original
computes with the removed heads and units zeroed; the new workdir loads in the other binaries."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from gpt_jax import checkpoint
from gpt_jax.compress import pruning
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer
from tiny_workdir import make_workdir, write_corpus

LAYOUTS = {
    'gpt2': {},
    'llama_gqa': dict(position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                      tie_embeddings=False, num_kv_heads=2, qk_norm=True),
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 20, (2, 24)), jnp.int32)


@pytest.fixture(scope='module')
def corpus(tfds_dir):
  return write_corpus(tfds_dir)


# Each layout ranks by one criterion (both criteria run, in half the time).
CRITERION = {'gpt2': 'magnitude', 'llama_gqa': 'activation'}


@pytest.fixture(scope='module', params=sorted(LAYOUTS))
def workdir(request, corpus, tfds_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  cfg, params = make_workdir(path, corpus, tfds_dir, scale=10.0, **LAYOUTS[request.param])
  return path, cfg, params, request.param


@functools.cache
def _forward(cfg):
  return jax.jit(Transformer(cfg).apply)


def logits(cfg, params):
  return np.asarray(_forward(cfg)({'params': params}, TOKENS)[0])


def zeroed(cfg, params, heads, units):
  """The original parameters with every head and unit not kept given zero output weights."""
  params = jax.tree.map(np.array, params)
  for i in range(cfg.num_layers):
    block = params[f'block_{i}']
    block['attn']['out']['kernel'][np.setdiff1d(np.arange(cfg.num_heads), heads[i])] = 0
    block['mlp']['fc_out']['kernel'][np.setdiff1d(np.arange(cfg.mlp_dim), units[i])] = 0
  return params


def test_pruning_nothing_changes_nothing(workdir, tmp_path):
  path, cfg, params, _ = workdir
  out = str(tmp_path / 'same')
  pruning.prune_workdir(path, out)
  new_cfg, new_params, _ = checkpoint.load_model(out)
  assert new_cfg == cfg
  np.testing.assert_array_equal(logits(new_cfg, new_params), logits(cfg, params))


def test_pruned_model_equals_original_with_removed_parts_zeroed(workdir, tmp_path):
  path, cfg, params, layout = workdir
  out = str(tmp_path / 'pruned')
  result = pruning.prune_workdir(path, out, heads_per_layer=2, mlp_dim=40,
                               criterion=CRITERION[layout], num_batches=2)
  new_cfg, new_params, _ = checkpoint.load_model(out)
  g = cfg.num_heads // cfg.kv_heads
  assert (new_cfg.num_heads, new_cfg.kv_heads, new_cfg.head_dim, new_cfg.mlp_dim) == (
      2, 2 // g, cfg.head_dim, 40)
  saved = checkpoint.load_config(out).model
  assert (saved.num_heads, saved.head_dim, saved.mlp_dim) == (2, cfg.head_dim, 40)
  attn, mlp = new_params['block_1']['attn'], new_params['block_1']['mlp']
  assert attn['query']['kernel'].shape == (cfg.emb_dim, 2, cfg.head_dim)
  assert attn['key']['kernel'].shape == (cfg.emb_dim, 2 // g, cfg.head_dim)
  assert attn['out']['kernel'].shape == (2, cfg.head_dim, cfg.emb_dim)
  assert mlp['fc_in']['kernel'].shape == (cfg.emb_dim, 40)
  assert mlp['fc_out']['kernel'].shape == (40, cfg.emb_dim)
  assert result['params_after'] == sum(x.size for x in jax.tree.leaves(new_params))
  heads, units = np.array(result['kept_heads']), np.array(result['kept_units'])
  for layer in heads:  # whole key/value groups
    assert np.all(layer.reshape(-1, g) // g == layer.reshape(-1, g)[:, :1] // g)
  expected = logits(cfg, zeroed(cfg, params, heads, units))
  # Equal up to float32 summation order (logits of size ~10 here).
  np.testing.assert_allclose(logits(new_cfg, new_params), expected, atol=1e-3, rtol=1e-4)
  # Something was removed that mattered: the pruned model differs from the original.
  assert np.abs(expected - logits(cfg, params)).max() > 0.1


def test_magnitude_keeps_the_largest_head_and_unit():
  cfg = ModelConfig(vocab_size=16, num_layers=1, num_heads=4, emb_dim=8, mlp_dim=6)
  rng = np.random.default_rng(1)
  params = {'block_0': {
      'attn': {n: {'kernel': rng.normal(size=s).astype(np.float32)} for n, s in (
          ('query', (8, 4, 2)), ('key', (8, 4, 2)), ('value', (8, 4, 2)), ('out', (4, 2, 8)))},
      'mlp': {'fc_in': {'kernel': rng.normal(size=(8, 6)).astype(np.float32)},
              'fc_out': {'kernel': rng.normal(size=(6, 8)).astype(np.float32)}}}}
  params['block_0']['attn']['out']['kernel'][2] *= 100
  params['block_0']['mlp']['fc_out']['kernel'][4] *= 100
  heads, units = pruning.select(*pruning.magnitude_scores(cfg, params), cfg, 1, 1)
  assert heads.tolist() == [[2]] and units.tolist() == [[4]]


def test_binary_writes_a_workdir_that_eval_loads(workdir, tmp_path):
  path, cfg, _, layout = workdir
  out = str(tmp_path / 'cli')
  if layout == 'gpt2':  # one binary run is enough; the errors, in-process
    with pytest.raises(ConfigError, match='heads_per_layer'):
      pruning.prune_workdir(path, out, heads_per_layer=5)
    return
  with pytest.raises(ConfigError, match='multiple of 2'):
    pruning.prune_workdir(path, out, heads_per_layer=3)
  proc = run_module('gpt_jax.prune', f'--workdir={path}', f'--out={out}', '--heads_per_layer=2',
                    '--mlp_dim=32', '--criterion=activation', '--batches=1')
  assert '2 heads and 32 MLP units per layer' in proc.stdout
  proc = run_module('gpt_jax.eval', f'--workdir={out}', '--progress_bar=false')
  assert 'loss' in proc.stdout
  with pytest.raises(ConfigError, match='already holds checkpoints'):
    pruning.prune_workdir(path, out)


def test_bad_targets_are_named():
  cfg = ModelConfig(num_heads=4, num_kv_heads=2, mlp_dim=8)
  with pytest.raises(ConfigError, match='heads_per_layer'):
    pruning.check_targets(cfg, 3, 8)
  with pytest.raises(ConfigError, match='mlp_dim'):
    pruning.check_targets(cfg, 2, 9)
