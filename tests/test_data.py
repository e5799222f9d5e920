"""TFDS builders and the data pipeline, offline, everything under tmp_path."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pydoc_data.topics
import pytest
import tensorflow_datasets as tfds

from gpt_jax import data
from gpt_jax import datasets
from gpt_jax import tokenizer as tokenizer_lib

ARRAY_RECORD = {'file_format': 'array_record'}


def make_config(tmp_path, **data_overrides):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(
      tfds_name='pydoc_topics', tfds_data_dir=str(tmp_path / 'tfds'), text_key='text',
      train_split='train', val_split='validation', text_files='', val_fraction=0.1,
      tokenizer='byte', vocab_size=512, spm_model='', spm_train_chars=1_000_000,
      batch_size=8, eval_batch_size=0, seq_len=32, cache_dir='', prefetch=2))
  config.data.update(data_overrides)
  return config


def write_random_files(directory, sizes, seed=0):
  """Text files of random words: every 33-byte window is unique, so we can find it."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz   \n'))
  os.makedirs(directory, exist_ok=True)
  texts = []
  for i, size in enumerate(sizes):
    text = ''.join(rng.choice(letters, size))
    with open(os.path.join(directory, f'doc{i}.txt'), 'w', encoding='utf-8') as f:
      f.write(text)
    texts.append(text)
  return texts


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['targets'], y['targets'])


# ---------------------------------------------------------------------------
# TFDS builders
# ---------------------------------------------------------------------------


def test_text_files_builder_splits_each_file_90_10(tmp_path):
  texts = write_random_files(tmp_path / 'files', [1000, 777])
  texts.append('ünïcödé 中文 😀\n' * 13)
  with open(tmp_path / 'files' / 'doc2.txt', 'w', encoding='utf-8') as f:
    f.write(texts[-1])
  config = datasets.text_files.builder_config(str(tmp_path / 'files' / '*.txt'), 0.1)
  splits = tfds.data_source('text_files', data_dir=str(tmp_path / 'tfds'),
                            builder_kwargs={'config': config, **ARRAY_RECORD})
  train = [x['text'].decode() for x in splits['train']]
  validation = [x['text'].decode() for x in splits['validation']]
  assert train == [t[:int(len(t) * 0.9)] for t in texts]  # nanoGPT's split, per file.
  assert validation == [t[int(len(t) * 0.9):] for t in texts]


def test_text_files_config_identity(tmp_path):
  write_random_files(tmp_path / 'a', [100, 100])
  write_random_files(tmp_path / 'b', [100])
  name = lambda pattern, fraction=0.1: datasets.text_files.builder_config(
      str(tmp_path / pattern), fraction).name
  assert name('a/*.txt') == name('a/*.txt')  # Unchanged files: the same dataset.
  assert name('a/*.txt') != name('b/*.txt')
  assert name('a/*.txt') != name('a/doc0.txt')
  assert name('a/*.txt') != name('a/*.txt', 0.2)
  with open(tmp_path / 'a' / 'doc0.txt', 'a') as f:
    f.write('more')
  assert name('a/*.txt') != name('a/doc0.txt') != name('b/*.txt')
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    datasets.text_files.builder_config(str(tmp_path / 'nothing_here/*.txt'), 0.1)


def test_pydoc_topics_builds_by_name_and_splits_recombine(tmp_path):
  splits = tfds.data_source('pydoc_topics', data_dir=str(tmp_path),
                            builder_kwargs=ARRAY_RECORD)
  topics = pydoc_data.topics.topics
  expected = [topics[name] for name in sorted(topics)]
  train = [x['text'].decode() for x in splits['train']]
  validation = [x['text'].decode() for x in splits['validation']]
  assert [t + v for t, v in zip(train, validation)] == expected
  assert [len(t) for t in train] == [int(len(t) * 0.9) for t in expected]


def test_open_texts_errors(tmp_path):
  with pytest.raises(ValueError, match='data.tfds_name'):
    data.open_texts(make_config(tmp_path, tfds_name='no_such_dataset_xyz').data, 'train')
  with pytest.raises(ValueError, match='data.text_key'):
    data.open_texts(make_config(tmp_path, text_key='content').data, 'train')
  with pytest.raises(FileNotFoundError, match='missing'):
    data.open_texts(make_config(tmp_path, text_files=str(tmp_path / 'missing*.txt')).data,
                    'train')


# ---------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A byte-tokenized text_files corpus: (config, tokenizer, workdir)."""
  root = tmp_path_factory.mktemp('corpus')
  write_random_files(root / 'files', [3000, 2000, 4000])
  config = make_config(root, text_files=str(root / 'files' / '*.txt'))
  workdir = str(root / 'workdir')
  tokenizer = data.prepare_tokenizer(config, workdir)
  return config, tokenizer, workdir


def window_starts(rows, stream):
  """Where each row (inputs + last target) starts in the token stream."""
  haystack = np.asarray(stream, np.uint16).tobytes()
  starts = []
  for inputs, targets in zip(rows['inputs'], rows['targets']):
    needle = np.concatenate([inputs, targets[-1:]]).astype(np.uint16).tobytes()
    position = haystack.find(needle)
    assert position >= 0 and position % 2 == 0
    starts.append(position // 2)
  return starts


def test_train_batches_are_windows_of_the_stream(corpus):
  config, tokenizer, workdir = corpus
  batch = next(data.make_train_iterator(config, tokenizer, workdir, 0, 1))
  assert set(batch) == {'inputs', 'targets'}
  for x in batch.values():
    assert x.shape == (8, 32) and x.dtype == np.int32
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  stream = data.token_stream(config.data, tokenizer, workdir, 'train')
  assert stream.dtype == np.uint16
  # Documents are joined by EOS: 3 files -> 3 EOS, 90% of 9000 bytes in all.
  assert len(stream) == 8100 + 3 and np.sum(stream == tokenizer.eos_id) == 3
  window_starts(batch, stream)


def test_one_epoch_reads_every_window_once(corpus):
  config, tokenizer, workdir = corpus
  stream = data.token_stream(config.data, tokenizer, workdir, 'train')
  window = config.data.seq_len + 1
  num_windows = (len(stream) - window + 1) // window
  iterator = data.make_train_iterator(config, tokenizer, workdir, 0, 1)
  rows = take(iterator, 3 * num_windows // 8 + 1)
  rows = {k: np.concatenate([b[k] for b in rows]) for k in ['inputs', 'targets']}
  for epoch in range(3):
    epoch_rows = {k: v[epoch * num_windows:(epoch + 1) * num_windows] for k, v in rows.items()}
    starts = np.array(window_starts(epoch_rows, stream))
    offset = starts[0] % window
    # Non-overlapping, shuffled, at one offset per epoch.
    assert sorted(starts) == list(offset + window * np.arange(num_windows))
    assert list(starts) != sorted(starts)


def test_train_order_is_deterministic_from_seed(corpus):
  config, tokenizer, workdir = corpus
  first = take(data.make_train_iterator(config, tokenizer, workdir, 0, 1), 5)
  again = take(data.make_train_iterator(config, tokenizer, workdir, 0, 1), 5)
  assert_batches_equal(first, again)
  other_seed = config.copy_and_resolve_references()
  other_seed.seed = 1
  other = take(data.make_train_iterator(other_seed, tokenizer, workdir, 0, 1), 5)
  assert not np.array_equal(first[0]['inputs'], other[0]['inputs'])


def test_train_iterator_resumes_from_state(corpus):
  config, tokenizer, workdir = corpus
  iterator = data.make_train_iterator(config, tokenizer, workdir, 0, 1)
  take(iterator, 7)
  state = iterator.get_state()
  json.dumps(state)  # Checkpointable as JSON (what orbax's grain handler writes).
  expected = take(iterator, 30)  # Crosses an epoch boundary (~30 batches an epoch).
  restored = data.make_train_iterator(config, tokenizer, workdir, 0, 1)
  restored.set_state(state)
  assert_batches_equal(take(restored, 30), expected)


def test_processes_share_the_global_batch(corpus):
  config, tokenizer, workdir = corpus
  single = take(data.make_train_iterator(config, tokenizer, workdir, 0, 1), 4)
  halves = [take(data.make_train_iterator(config, tokenizer, workdir, p, 2), 4)
            for p in range(2)]
  for step, batch in enumerate(single):
    for key in ['inputs', 'targets']:
      assert halves[0][step][key].shape == (4, 32)
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  with pytest.raises(ValueError, match='data.batch_size'):
    data.make_train_iterator(config, tokenizer, workdir, 0, 3)


def test_a_resumed_run_with_another_global_batch_moves_its_position(corpus):
  """The saved position counts global batches, not windows: resumed with batch B' after n
  batches of B, a run reads on from window n * B' of the epoch's order, so that epoch skips
  n * (B' - B) windows when the batch grows and reads n * (B - B') twice when it shrinks."""
  config, tokenizer, workdir = corpus
  window_rows = lambda batches: [tuple(row) for b in batches for row in b['inputs']]
  with_batch = lambda size: data.make_train_iterator(
      ml_collections.ConfigDict({**config.to_dict(), 'data': {**config.data.to_dict(),
                                                              'batch_size': size}}),
      tokenizer, workdir, 0, 1)
  order = window_rows(take(with_batch(8), 12))  # the epoch's first 96 windows
  written = with_batch(8)
  assert window_rows(take(written, 3)) == order[:24]
  for size, first_read in ((16, 48), (4, 12)):
    resumed = with_batch(size)
    resumed.set_state(written.get_state())
    assert window_rows(take(resumed, 2)) == order[first_read:first_read + 2 * size]


def test_eval_batches(corpus):
  config, tokenizer, workdir = corpus
  batches = data.make_eval_batches(config, tokenizer, workdir, 2, 0, 1)
  assert len(batches) == 2 and batches[0]['inputs'].shape == (8, 32)
  assert batches[0]['inputs'].dtype == np.int32
  stream = data.token_stream(config.data, tokenizer, workdir, 'validation')
  # In order, from the start of the split.
  np.testing.assert_array_equal(batches[0]['inputs'][0], stream[:32])
  np.testing.assert_array_equal(batches[1]['targets'][0], stream[8 * 33 + 1:8 * 33 + 33])
  halves = [data.make_eval_batches(config, tokenizer, workdir, 2, p, 2) for p in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step]['inputs'], halves[1][step]['inputs']]),
        batches[step]['inputs'])
  # 903 validation tokens hold 3 batches of 8 x 33: asking for more gives 3.
  assert len(data.make_eval_batches(config, tokenizer, workdir, 100, 0, 1)) == 3
  too_big = config.copy_and_resolve_references()
  too_big.data.batch_size = 64
  with pytest.raises(ValueError, match="'validation' has 903 tokens"):
    data.make_eval_batches(too_big, tokenizer, workdir, 1, 0, 1)
  # A larger eval batch holds the same windows in fewer, larger batches.
  wide = config.copy_and_resolve_references()
  wide.data.eval_batch_size = 16
  wide_batches = data.make_eval_batches(wide, tokenizer, workdir, 1, 0, 1)
  assert len(wide_batches) == 1 and wide_batches[0]['inputs'].shape == (16, 32)
  for key in ('inputs', 'targets'):
    np.testing.assert_array_equal(wide_batches[0][key],
                                  np.concatenate([batches[0][key], batches[1][key]]))


def test_token_cache_is_reused_and_keyed_by_tokenizer(corpus, tmp_path):
  config, tokenizer, workdir = corpus
  cache = os.path.join(workdir, 'data_cache')
  data.token_stream(config.data, tokenizer, workdir, 'train')
  files = sorted(os.listdir(cache))
  mtimes = [os.path.getmtime(os.path.join(cache, f)) for f in files]
  data.token_stream(config.data, tokenizer, workdir, 'train')
  assert [os.path.getmtime(os.path.join(cache, f)) for f in files] == mtimes
  char_tokenizer = tokenizer_lib.build(
      make_config(tmp_path, tokenizer='char').data,
      data.open_texts(config.data, 'train'), str(tmp_path / 'char'))
  data.token_stream(config.data, char_tokenizer, workdir, 'train')
  streams = lambda: [f for f in os.listdir(cache) if f.endswith('.npy')]
  assert len(streams()) == len([f for f in files if f.endswith('.npy')]) + 1


def test_cached_stream_is_read_without_tfds_and_follows_the_files(tmp_path):
  write_random_files(tmp_path / 'files', [3000, 2000])
  config = make_config(tmp_path, text_files=str(tmp_path / 'files' / '*.txt'))
  workdir = str(tmp_path / 'workdir')
  tokenizer = data.prepare_tokenizer(config, workdir)
  built = np.asarray(data.token_stream(config.data, tokenizer, workdir, 'train'))
  # A new process (a restarted run) finds the stream without importing TFDS.
  script = (
      'import json, sys, ml_collections, numpy as np\n'
      'from gpt_jax import data, tokenizer\n'
      f'config = ml_collections.ConfigDict(json.loads({config.data.to_json()!r}))\n'
      f'stream = data.token_stream(config, tokenizer.load({workdir!r} + "/tokenizer"), '
      f'{workdir!r}, "train")\n'
      'print(json.dumps([np.asarray(stream).tolist(), "tensorflow_datasets" in sys.modules]))')
  out = subprocess.run([sys.executable, '-c', script], check=True, capture_output=True,
                       text=True).stdout
  tokens, imported_tfds = json.loads(out.splitlines()[-1])
  assert tokens == built.tolist() and not imported_tfds
  # A changed file is another corpus: built and tokenized anew, not read from the cache.
  with open(tmp_path / 'files' / 'doc1.txt', 'a', encoding='utf-8') as f:
    f.write('more text ' * 100)
  assert len(data.token_stream(config.data, tokenizer, workdir, 'train')) == len(built) + 900


def test_default_corpus_with_sentencepiece(tmp_path):
  """The default path end to end: pydoc_topics, a trained sentencepiece, batches."""
  config = make_config(tmp_path, tokenizer='sentencepiece', vocab_size=512)
  workdir = str(tmp_path / 'workdir')
  tokenizer = data.prepare_tokenizer(config, workdir)
  assert tokenizer.vocab_size == 512
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  batch = next(data.make_train_iterator(config, tokenizer, workdir, 0, 1))
  assert batch['inputs'].shape == (8, 32) and batch['inputs'].max() < 512
  assert len(data.make_eval_batches(config, tokenizer, workdir, 2, 0, 1)) == 2
  # A second call loads the saved tokenizer instead of training again.
  again = data.prepare_tokenizer(config, workdir)
  text = pydoc_data.topics.topics['assert']
  assert again.encode(text) == tokenizer.encode(text)
