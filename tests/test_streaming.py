"""Streaming input (gpt_jax/streaming.py): documents read, tokenized and packed on the fly."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, module_env, read_metrics, train
from test_data import make_config, write_random_files
from gpt_jax import config as config_lib
from gpt_jax import data, streaming
from gpt_jax import tokenizer as tokenizer_lib

# Sizes that give documents shorter and longer than a window of 33 tokens, and an empty one.
SIZES = [3000, 40, 700, 0, 90, 1500, 20, 333, 5, 1200, 64, 800]


def streaming_config(root, **overrides):
  return make_config(root, **{
      'text_files': str(root / 'files' / '*.txt'), 'streaming': 'true', 'worker_count': 0,
      'shuffle_buffer': 0, 'document_masking': True, 'prefetch': 0, **overrides})


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(root, byte tokenizer, the train split's documents as token lists)."""
  root = tmp_path_factory.mktemp('streaming')
  texts = write_random_files(root / 'files', SIZES, seed=3)
  config = streaming_config(root)
  tokenizer = data.prepare_tokenizer(config, str(root / 'workdir'))
  streaming.prepare(config.data, 'train')
  documents = [tokenizer.encode(t[:int(len(t) * 0.9)]) + [tokenizer.eos_id] for t in texts]
  return root, tokenizer, [d for d in documents if len(d) > 1]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def token_stream(batches):
  """The tokens the windows were cut from: each row is inputs + its last target, in order."""
  return np.concatenate([np.concatenate([inputs, targets[-1:]])
                         for b in batches for inputs, targets in zip(b['inputs'], b['targets'])])


def split_documents(stream, eos_id):
  ends = np.flatnonzero(stream == eos_id)
  return [stream[start:end + 1].tolist() for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_each_epoch_packs_every_document_once_in_a_fresh_order(corpus):
  root, tokenizer, documents = corpus
  config = streaming_config(root)
  total = sum(map(len, documents))
  batches = take(streaming.make_train_iterator(config, tokenizer, 0, 1),
                 2 * total // (8 * 33) + 2)
  for b in batches:
    assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions'}
    assert all(v.shape == (8, 32) and v.dtype == np.int32 for v in b.values())
    # grain's segments are the documents: a new one after each EOS, positions from 0.
    for key, value in data.document_segments(b['inputs'], tokenizer.eos_id).items():
      np.testing.assert_array_equal(b[key], value)
  read = split_documents(token_stream(batches), tokenizer.eos_id)
  first, second = read[:len(documents)], read[len(documents):2 * len(documents)]
  assert sorted(first) == sorted(second) == sorted(documents)
  assert first != second != documents  # shuffled, and reshuffled for the next epoch
  # The same seed reads the same batches; the bounded window shuffle keeps the windows.
  again = take(streaming.make_train_iterator(config, tokenizer, 0, 1), len(batches))
  np.testing.assert_array_equal(token_stream(again), token_stream(batches))
  shuffled = take(streaming.make_train_iterator(
      streaming_config(root, shuffle_buffer=16), tokenizer, 0, 1), 4)
  windows = lambda bs: sorted(map(tuple, token_stream(bs).reshape(-1, 33)))
  assert windows(shuffled) == windows(batches[:4])
  assert not np.array_equal(token_stream(shuffled), token_stream(batches[:4]))


def test_document_segments_and_the_cached_mode_masks_documents_too(corpus):
  segments = data.document_segments(np.array([[5, 0, 7, 8, 0, 9], [0, 0, 1, 2, 3, 4]]), 0)
  np.testing.assert_array_equal(segments['segment_ids'], [[1, 1, 2, 2, 2, 3], [1, 2, 3, 3, 3, 3]])
  np.testing.assert_array_equal(segments['positions'], [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]])
  root, tokenizer, _ = corpus
  config = streaming_config(root, streaming='false')
  workdir = str(root / 'workdir')
  batches = take(data.make_train_iterator(config, tokenizer, workdir, 0, 1), 3)
  batches += data.make_eval_batches(config, tokenizer, workdir, 1, 0, 1)
  for b in batches:
    for key, value in data.document_segments(b['inputs'], tokenizer.eos_id).items():
      np.testing.assert_array_equal(b[key], value)
  assert max(b['segment_ids'].max() for b in batches) > 1
  char = tokenizer_lib.CharTokenizer('abc')
  with pytest.raises(ValueError, match='data.document_masking needs a tokenizer with an end'):
    data.make_eval_batches(config, char, workdir, 1, 0, 1)


def test_validation_batches_are_the_leading_documents_packed(corpus):
  root, tokenizer, _ = corpus
  config = streaming_config(root)
  batches = streaming.make_eval_batches(config, tokenizer, 5, 0, 1)
  texts = [t for t in data.open_texts(config.data, 'validation') if t]
  expected = np.concatenate([tokenizer.encode(t) + [tokenizer.eos_id] for t in texts])
  # 788 validation tokens: 2 whole batches of 8 x 33, of the 5 asked for.
  assert len(expected) == 788 and len(batches) == 2
  np.testing.assert_array_equal(token_stream(batches), expected[:2 * 8 * 33])
  halves = [streaming.make_eval_batches(config, tokenizer, 5, p, 2) for p in (0, 1)]
  np.testing.assert_array_equal(
      np.concatenate([halves[0][0]['segment_ids'], halves[1][0]['segment_ids']]),
      batches[0]['segment_ids'])


def test_two_processes_read_disjoint_documents_that_cover_each_epoch(corpus):
  root, tokenizer, documents = corpus
  config = streaming_config(root)
  enough = 2 * sum(map(len, documents)) // (4 * 33) + 2  # for two epochs of either share
  reads = [split_documents(token_stream(take(
      streaming.make_train_iterator(config, tokenizer, p, 2), enough)), tokenizer.eos_id)
           for p in (0, 1)]
  # Process p reads positions p, p + 2, ... of each epoch's order of the 12 documents, 6 each;
  # the empty one is dropped from whichever process has it.
  n = len(documents)
  for epoch in range(2):
    covering = [k for k in range(n + 1)
                if sorted(reads[0][:k] + reads[1][:n - k]) == sorted(documents)]
    assert covering in ([5], [6])
    reads = [reads[0][covering[0]:], reads[1][n - covering[0]:]]


# Each process of a jax.distributed job on 127.0.0.1 prints the documents it reads, unsharded
# by hand: the process index and count come from JAX.
PROCESS_SCRIPT = """
import json, sys
import jax, ml_collections, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from gpt_jax import streaming, tokenizer
config = ml_collections.ConfigDict(json.loads(sys.argv[3]))
iterator = streaming.make_train_iterator(config, tokenizer.ByteTokenizer())
print(json.dumps([np.asarray(next(iterator)['inputs']).tolist() for _ in range(int(sys.argv[4]))]))
"""


def test_jax_processes_read_the_shares_the_process_index_names(corpus):
  root, tokenizer, documents = corpus
  config = streaming_config(root, shuffle_buffer=0)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, '-c', PROCESS_SCRIPT, f'127.0.0.1:{port}', str(i), config.to_json(), '3'],
      cwd=REPO, env=module_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    outputs.append(np.array(json.loads(out.splitlines()[-1])))
  for p, got in enumerate(outputs):
    expected = take(streaming.make_train_iterator(config, tokenizer, p, 2), 3)
    np.testing.assert_array_equal(got, [b['inputs'] for b in expected])


def test_workers_give_the_same_stream(corpus):
  root, tokenizer, _ = corpus
  expected = take(streaming.make_train_iterator(streaming_config(root), tokenizer, 0, 1), 6)
  iterator = streaming.make_train_iterator(streaming_config(root, worker_count=2, prefetch=2),
                                           tokenizer, 0, 1)
  try:
    got = take(iterator, 6)
  finally:
    iterator.close()
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_auto_streams_large_splits_and_config_is_checked(corpus, monkeypatch):
  root, _, _ = corpus
  auto = streaming_config(root, streaming='auto').data
  assert not data.use_streaming(auto)  # 7.5 KB of text
  monkeypatch.setattr(data, 'STREAM_ABOVE_BYTES', 1000)
  assert data.use_streaming(auto)
  assert not data.use_streaming(streaming_config(root, streaming='false').data)
  base = config_lib.base_config()
  assert base.data.streaming == 'auto' and not data.use_streaming(base.data)  # pydoc_topics
  for field, value, message in (('streaming', 'yes', 'data.streaming must be one of'),
                                ('worker_count', -1, 'data.worker_count must be >= 0')):
    bad = config_lib.base_config()
    bad.data[field] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad)


def test_compiled_steps_take_the_masked_batch():
  """gpt_jax.aot compiles the batch training reads: with document masking, segment ids too."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpt_jax import checkpoint, optim, sharding  # pylint: disable=import-outside-toplevel
  from gpt_jax import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from gpt_jax.model import ModelConfig, Transformer  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.model.update(num_layers=1, num_heads=2, emb_dim=32, mlp_dim=64, max_len=16,
                      vocab_size=64)
  config.data.document_masking = True
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.build(config, Transformer(ModelConfig.from_config(config.model)),
                          optim.make_optimizer(config.optim, 10),
                          optim.learning_rate_schedule(config.optim, 10), mesh,
                          sharding.logical_rules(config.mesh),
                          checkpoint.trainable_params(config, None))
  batch = steps.abstract_batch(2, 16)
  assert sorted(batch) == ['inputs', 'positions', 'segment_ids', 'targets']
  with jax.set_mesh(mesh):
    steps.eval_step.lower(steps.abstract_state.params, batch, steps.abstract_frozen)


def test_a_split_too_large_for_tfds_memory_buffer_asks_for_tensorflow(tmp_path, monkeypatch):
  if importlib.util.find_spec('tensorflow'):
    pytest.skip('TensorFlow is installed: TFDS builds large splits')
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', 1000)  # as if the files held > 1 GB
  write_random_files(tmp_path / 'files', [3000])
  with pytest.raises(ValueError, match='needs TensorFlow .* pip install tensorflow-cpu'):
    streaming.prepare(streaming_config(tmp_path).data, 'train')


def test_streaming_run_resumes_from_its_checkpoint_exactly(tmp_path, tfds_dir):
  """Two tokenizer workers, document masking: a run resumed from step 4 (its step-8
  checkpoint lost, as when killed) trains on the batches the uninterrupted run trained on."""
  write_random_files(tmp_path / 'files', [4000] * 4 + [300] * 12, seed=5)
  run = {'data.text_files': str(tmp_path / 'files' / '*.txt'), 'data.tokenizer': 'byte',
         'data.streaming': 'true', 'data.worker_count': 2, 'data.document_masking': True,
         'train.num_steps': 8, 'train.log_every': 1, 'train.eval_every': 0,
         'checkpoint.every_steps': 4, 'optim.warmup_steps': 2}
  workdir = str(tmp_path / 'run')
  train(workdir, tfds_dir, **run)
  straight = {k: read_metrics(workdir, k) for k in ('train_loss', 'grad_norm')}
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  proc = train(workdir, tfds_dir, **run)
  assert 'Resuming from step 4' in proc.stderr
  assert {k: read_metrics(workdir, k) for k in straight} == straight
  assert len(straight['train_loss']) == 8
