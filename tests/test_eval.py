"""The eval binary: loss, perplexity and bits per byte over a whole split, sharded over devices."""

import json
import math
import os

import jax
import numpy as np
import optax
import pytest

from conftest import run_module, train
from gpt_jax import checkpoint, data, eval as eval_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.model import Transformer

TINY_RUN = {'train.num_steps': 5, 'model.num_layers': 1, 'model.emb_dim': 32,
            'model.mlp_dim': 64, 'data.seq_len': 32, 'model.max_len': 32, 'data.batch_size': 4,
            'train.eval_every': 0}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tfds_dir):
  directory = str(tmp_path_factory.mktemp('trained'))
  train(directory, tfds_dir, **TINY_RUN)
  return directory


def reference(workdir, data_config, split, seq_len):
  """Total nats and predicted tokens, by a plain loop over the split's token stream."""
  cfg, params, _ = checkpoint.load_model(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  tokens = np.asarray(data.token_stream(data_config, tokenizer, workdir, split), np.int32)
  forward = jax.jit(lambda x: Transformer(cfg).apply({'params': params}, x)[0])
  total = 0.0
  for start in range(0, len(tokens) - 1, seq_len):
    window = tokens[start:start + seq_len + 1][None]
    logits = forward(window[:, :-1])
    total += float(optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).sum())
  return total, len(tokens) - 1


def test_eval_whole_split_on_two_devices(workdir, tfds_dir):
  proc = run_module('gpt_jax.eval', f'--workdir={workdir}', '--batch_size=3', devices=2)
  path = os.path.join(workdir, 'eval', 'pydoc_topics-validation-step5.json')
  assert path in proc.stdout and 'bits/byte' in proc.stdout
  assert 'eval validation' in proc.stderr  # the progress bar
  with open(path) as f:
    result = json.load(f)
  assert result['devices'] == 2 and result['batch_size'] == 4  # rounded up to the devices
  config = checkpoint.load_config(workdir)
  loss_sum, count = reference(workdir, config.data, 'validation', 32)
  num_bytes = sum(len(t.encode('utf-8')) for t in data.open_texts(config.data, 'validation'))
  assert result['tokens'] == count and result['bytes'] == num_bytes
  assert result['loss'] == pytest.approx(loss_sum / count, rel=1e-5)
  assert result['perplexity'] == pytest.approx(math.exp(result['loss']))
  assert result['bits_per_byte'] == pytest.approx(loss_sum / (math.log(2) * num_bytes), rel=1e-5)


def test_eval_text_files_and_errors(workdir, tmp_path):
  (tmp_path / 'a.txt').write_text('def f(x):\n    return x + 1\n' * 20)
  (tmp_path / 'b.txt').write_text('Caf\u00e9 \u4e2d\u6587 text.\n' * 30)
  pattern = str(tmp_path / '*.txt')
  result = eval_lib.evaluate(workdir, split='train', text_files=pattern, seq_len=16)
  config = checkpoint.load_config(workdir)
  config.data.text_files = pattern
  loss_sum, count = reference(workdir, config.data, 'train', 16)
  texts = list(data.open_texts(config.data, 'train'))
  assert result['bytes'] == sum(len(t.encode('utf-8')) for t in texts)
  assert result['tokens'] == count and result['loss'] == pytest.approx(loss_sum / count, rel=1e-5)
  assert os.path.exists(os.path.join(workdir, 'eval', 'text_files-train-step5.json'))

  with pytest.raises(FileNotFoundError, match='matches no files'):
    eval_lib.evaluate(workdir, text_files=str(tmp_path / '*.nothing'))
  with pytest.raises(ValueError, match=r'--seq_len must be in \[1, 32\]'):
    eval_lib.evaluate(workdir, seq_len=64)
  proc = run_module('gpt_jax.eval', f'--workdir={tmp_path / "missing"}', check=False)
  assert proc.returncode == 1
  missing = tmp_path / 'missing'
  assert proc.stderr.strip().splitlines() == [f'error: Workdir {missing} does not exist']
