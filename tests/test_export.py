"""Export: the StableHLO programs reload with jax.export alone (no gpt_jax) and give the model's
logits and greedy tokens; the ONNX graph passes onnx.checker and runs in onnxruntime."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import module_env
from gpt_jax import checkpoint, decode
from gpt_jax.convert import export as exporting
from gpt_jax.errors import ConfigError
from gpt_jax.model import Transformer
from tiny_workdir import make_workdir, write_corpus

BATCH, LENGTH, NEW = 2, 24, 8
PROMPTS = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8]]

# Runs in a fresh interpreter that imports jax and numpy only.
RELOAD = r'''
import json, sys
import jax, numpy as np
out, tokens = sys.argv[1], np.load(sys.argv[2])
prompts, new = json.loads(sys.argv[3]), int(sys.argv[4])
load = lambda name: jax.export.deserialize(open(f'{out}/{name}.jax_exported', 'rb').read())
manifest = json.load(open(f'{out}/manifest.json'))
np.save(sys.argv[2] + '.logits.npy', np.asarray(load('forward').call(tokens)))
num_tokens = manifest['num_tokens']
padded = np.zeros(tokens.shape, np.int32)
for row, p in enumerate(prompts):
  padded[row, :len(p)] = p
lengths = np.array([len(p) for p in prompts], np.int32)
logits, cache = load('prefill').call(padded, lengths)
step, generated = load('decode_step'), []
for _ in range(new):
  next_tokens = np.argmax(np.asarray(logits)[:, :num_tokens], axis=-1).astype(np.int32)
  generated.append(next_tokens.tolist())
  logits, cache = step.call(next_tokens, lengths, cache)
  lengths = lengths + 1
print(json.dumps({'imported_gpt_jax': 'gpt_jax' in sys.modules,
                  'tokens': np.array(generated).T.tolist()}))
'''


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tfds_dir):
  path = tmp_path_factory.mktemp('export')
  corpus = write_corpus(tfds_dir)
  # No biases: the ONNX form gives GPT-2 zero ones.
  cfg, params = make_workdir(str(path / 'model'), corpus, tfds_dir, scale=3.0, use_bias=False)
  return str(path / 'model'), cfg, params


@pytest.fixture(scope='module')
def tokens():
  return np.random.default_rng(0).integers(0, 20, (BATCH, LENGTH)).astype(np.int32)


@pytest.fixture(scope='module')
def expected(workdir, tokens):
  _, cfg, params = workdir
  logits = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, tokens)[0])
  greedy = decode.Generator(cfg, params, num_tokens=cfg.vocab_size).generate(
      PROMPTS, NEW, temperature=0.0)
  return logits, [list(row) for row in greedy]


def test_stablehlo_reloads_without_gpt_jax_and_matches(workdir, tokens, expected, tmp_path):
  path, cfg, _ = workdir
  out = str(tmp_path / 'hlo')
  manifest = exporting.export(path, 'stablehlo', out, batch=BATCH, max_len=LENGTH, decode=True)
  assert sorted(manifest['functions']) == ['decode_step', 'forward', 'prefill']
  step = manifest['functions']['decode_step']
  assert [i['name'] for i in step['inputs']][:4] == ['tokens', 'positions', 'cache_0_k',
                                                     'cache_0_v']
  assert step['inputs'][2]['shape'] == [BATCH, cfg.kv_heads, cfg.max_len, cfg.head_dim]
  assert os.path.exists(os.path.join(out, 'tokenizer')) and os.path.getsize(
      os.path.join(out, 'forward.mlir')) > 0
  np.save(str(tmp_path / 'tokens.npy'), tokens)
  proc = subprocess.run([sys.executable, '-c', RELOAD, out, str(tmp_path / 'tokens.npy'),
                         json.dumps(PROMPTS), str(NEW)], env=module_env(), capture_output=True,
                        text=True, check=True, timeout=300)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['imported_gpt_jax'] is False
  logits, greedy = expected
  np.testing.assert_allclose(np.load(str(tmp_path / 'tokens.npy.logits.npy')), logits,
                             atol=1e-5, rtol=1e-5)
  assert result['tokens'] == greedy


def test_onnx_runs_in_onnxruntime_like_the_model(workdir, tokens, expected, tmp_path):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  path, cfg, params = workdir
  out = str(tmp_path / 'onnx')
  manifest = exporting.export(path, 'onnx', out, batch=BATCH, max_len=LENGTH, decode=True)
  assert sorted(manifest['functions']) == ['decode_step', 'forward', 'prefill']
  session = {name: onnxruntime.InferenceSession(os.path.join(out, f'{name}.onnx'))
             for name in manifest['functions']}
  logits, greedy = expected
  run = lambda t: session['forward'].run(['logits'], {'tokens': t.astype(np.int64)})[0]
  np.testing.assert_allclose(run(tokens), logits, atol=1e-4, rtol=1e-4)

  # Greedy decoding with the exported prefill and decode step, the KV cache passed along:
  # the same tokens as gpt_jax's decoder (what gpt_jax.sample --temperature=0 runs).
  cache_names = [i['name'] for i in manifest['functions']['decode_step']['inputs'][2:]]
  padded = np.zeros((BATCH, LENGTH), np.int64)
  for row, p in enumerate(PROMPTS):
    padded[row, :len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS], np.int64)
  step_logits, *cache = session['prefill'].run(None, {'tokens': padded, 'lengths': lengths})
  full = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, padded)[0])
  np.testing.assert_allclose(step_logits, full[np.arange(BATCH), lengths - 1], atol=1e-4,
                             rtol=1e-4)
  generated = []
  for _ in range(NEW):
    next_tokens = np.argmax(step_logits, axis=-1)
    generated.append(next_tokens.tolist())
    step_logits, *cache = session['decode_step'].run(None, {
        'tokens': next_tokens, 'positions': lengths, **dict(zip(cache_names, cache))})
    lengths = lengths + 1
  assert np.array(generated).T.tolist() == greedy


def test_what_cannot_export_is_named(workdir, tmp_path):
  path, _, _ = workdir
  with pytest.raises(ConfigError, match='--max_len must be in'):
    exporting.export(path, 'stablehlo', str(tmp_path / 'b'), max_len=1000)
  llama = tmp_path / 'llama'  # refused before its parameters are read: a config is enough
  config = checkpoint.load_config(path)
  config.model.position = 'rope'
  checkpoint.save_config(str(llama), config)
  with pytest.raises(ConfigError, match="model.position='rope'"):
    exporting.export(str(llama), 'onnx', str(tmp_path / 'c'))
