"""Data: TFDS documents -> tokenizer -> one token stream per split -> batches.

1. Documents come from a TFDS dataset read with `tfds.data_source` (array_record
   files, no TensorFlow): our own `pydoc_topics` (the default) or `text_files`
   (`data.text_files`, a glob), or any registered TFDS dataset (`data.tfds_name`).
2. Each split is tokenized once into a flat stream, each document followed by EOS
   when the tokenizer has one, and cached as
   `<data.cache_dir or <workdir>/data_cache>/<dataset>-<split>-<hash>.npy`, the hash
   covering the dataset (name/config/version), split and tokenizer files, so every
   run of a sweep reuses it. uint16 when the vocabulary fits, else uint32. For our own
   builders a pointer file, named by the files (paths, sizes, mtimes) or the CPython version
   the documents come from, finds the stream without importing TFDS.
3. Packing: the stream is cut into windows of seq_len + 1 tokens, with no padding;
   inputs = window[:-1], targets = window[1:].

Training order. nanoGPT draws every row at a random offset. We cut the stream into
non-overlapping windows and visit them in a shuffled order, so one epoch sees
every token once. Each epoch reshuffles the windows and shifts their boundaries
by a random offset, both derived from (config.seed, epoch), so that a small corpus
read for many epochs is not always cut at the same places. The iterator is a
grain pipeline: deterministic from the seed, and `get_state()`/`set_state()` save
and restore its position, so a resumed run reads exactly the batches it would
have read.

Batches are numpy dicts {'inputs', 'targets'}: int32[batch_size // process_count,
seq_len] holding this process's rows of the global batch: process p has rows
[p * local_batch, (p + 1) * local_batch) of the batch a single process would see.
With `data.document_masking`, they also hold 'segment_ids' (a new one after each EOS) and
'positions' restarting at 0 in each, so that attention does not cross documents.

This cached mode suits corpora that one process tokenizes in a minute or two. Larger ones
stream (gpt_jax/streaming.py): `data.streaming='auto'` streams a training split of more than
STREAM_ABOVE_BYTES of text (or of a size TFDS does not know before building it), 'true' and
'false' force either.
"""

import glob
import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterator

from absl import logging
import grain
import jax
import numpy as np

from gpt_jax import files
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def tfds_builder(data_config):
  """The (not yet prepared) TFDS builder for the configured corpus."""
  # Imported here: a run whose token streams are cached never needs TFDS (0.2-0.3 s to import).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from gpt_jax import datasets  # pylint: disable=g-import-not-at-top  (registers our builders)
  kwargs = {'data_dir': data_config.tfds_data_dir or None, 'file_format': 'array_record'}
  if data_config.text_files:
    config = datasets.text_files.builder_config(data_config.text_files, data_config.val_fraction)
    return tfds.builder('text_files', config=config, **kwargs)
  name = data_config.tfds_name
  if not name:
    raise ConfigError('Set data.tfds_name (e.g. "pydoc_topics") or data.text_files.')
  if name == 'pydoc_topics':
    kwargs['config'] = datasets.pydoc_topics.builder_config(data_config.val_fraction)
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.DatasetNotFoundError:
    raise ConfigError(f'data.tfds_name {name!r} is not a registered TFDS dataset.') from None


def open_texts(data_config, split: str) -> Iterator[str]:
  """The documents of `split`, building the dataset first if needed."""
  builder = tfds_builder(data_config)
  # Array_record, because that is what `as_data_source` reads without TensorFlow.
  try:
    builder.download_and_prepare(file_format='array_record')
  except ModuleNotFoundError as e:
    if e.name != 'tensorflow':
      raise
    # TFDS's writer keeps up to 1 GB of a split in memory and spills the rest with tf.io.gfile.
    raise ConfigError(f'Building {builder.info.full_name} needs TensorFlow (TFDS writes splits '
                      'of more than 1 GB through it): pip install tensorflow-cpu, then run '
                      'again; reading it afterwards does not.') from None
  key = data_config.text_key
  if key not in builder.info.features:
    raise ConfigError(f'data.text_key {key!r} is not a feature of {builder.info.full_name}; '
                     f'it has {list(builder.info.features)}.')
  source = builder.as_data_source(split=split)

  def texts():
    for example in source:
      text = example[key]
      yield text.decode('utf-8') if isinstance(text, bytes) else text

  return texts()


# ---------------------------------------------------------------------------
# Tokenizer and token streams
# ---------------------------------------------------------------------------


def prepare_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: loaded from <workdir>/tokenizer/, else built from the train split."""
  directory = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(directory):
    return tokenizer_lib.load(directory)
  train_texts = open_texts(config.data, config.data.train_split)
  tokenizer = tokenizer_lib.build(config.data, train_texts, directory)
  logging.info('Built a %s tokenizer with %d tokens in %s.', config.data.tokenizer,
               tokenizer.vocab_size, directory)
  return tokenizer


def _tokenizer_digest(tokenizer: tokenizer_lib.Tokenizer) -> str:
  """A hash of the files that define `tokenizer`."""
  digest = hashlib.sha256()
  with tempfile.TemporaryDirectory() as directory:
    tokenizer.save(directory)
    paths = sorted(os.path.relpath(os.path.join(root, name), directory)
                   for root, _, names in os.walk(directory) for name in names)
    for name in paths:  # (a Hugging Face tokenizer keeps its files in a subdirectory)
      with open(os.path.join(directory, name), 'rb') as f:
        digest.update(name.encode() + b'\0' + f.read())
  return digest.hexdigest()


def _source_identity(data_config) -> dict | None:
  """What our own builders' documents are made from, known without TFDS (the files matching
  data.text_files as they are on disk; CPython's version for pydoc_topics); None for other
  TFDS datasets."""
  if data_config.text_files:
    paths = sorted(os.path.abspath(p) for p in glob.glob(
        os.path.expanduser(data_config.text_files), recursive=True) if os.path.isfile(p))
    stats = [(p, os.stat(p)) for p in paths]
    return {'text_files': [(p, st.st_size, st.st_mtime_ns) for p, st in stats],
            'val_fraction': data_config.val_fraction}
  if data_config.tfds_name == 'pydoc_topics':
    return {'pydoc_topics': platform.python_version(), 'val_fraction': data_config.val_fraction}
  return None


def token_stream(data_config, tokenizer: tokenizer_lib.Tokenizer, workdir: str,
                 split: str) -> np.ndarray:
  """All tokens of `split`, each document followed by EOS; cached, memory-mapped."""
  cache_dir = data_config.cache_dir or os.path.join(workdir, 'data_cache')
  tokenizer_digest = _tokenizer_digest(tokenizer)
  # A pointer to the cached stream, named by what the documents are made from, finds it
  # without building the TFDS builder (and importing TFDS): a restarted run starts sooner.
  source = _source_identity(data_config)
  pointer = None
  if source is not None:
    source_key = hashlib.sha256(json.dumps(
        {'source': source, 'split': split, 'text_key': data_config.text_key,
         'tokenizer': tokenizer_digest}, sort_keys=True).encode()).hexdigest()[:16]
    pointer = os.path.join(cache_dir, f'source-{source_key}.txt')
    if os.path.exists(pointer):
      with open(pointer) as f:
        path = os.path.join(cache_dir, f.read().strip())
      if os.path.exists(path):
        return np.load(path, mmap_mode='r')
  builder = tfds_builder(data_config)
  identity = {'dataset': builder.info.full_name, 'split': split,
              'text_key': data_config.text_key, 'tokenizer': tokenizer_digest}
  key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
  safe_split = re.sub(r'[^\w.-]', '_', split)  # e.g. 'train[:10%]'
  path = os.path.join(cache_dir, f'{builder.name}-{safe_split}-{key}.npy')
  if not os.path.exists(path):
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    docs = [np.asarray(tokenizer.encode(text) + eos, dtype)
            for text in open_texts(data_config, split) if text]
    tokens = np.concatenate(docs) if docs else np.zeros([0], dtype)
    with files.written_whole(path, 'wb') as f:
      np.save(f, tokens)
    logging.info('Tokenized %s split %r: %d documents, %d tokens -> %s',
                 builder.info.full_name, split, len(docs), len(tokens), path)
  if pointer is not None:
    with files.written_whole(pointer, 'w') as f:
      f.write(os.path.basename(path))
  return np.load(path, mmap_mode='r')


# ---------------------------------------------------------------------------
# Cached or streamed
# ---------------------------------------------------------------------------

# Where data.streaming='auto' starts streaming. The cached mode tokenizes a split in one process
# before the first step: 512 MiB of text took 6 minutes and 1 GB of memory, 2 GiB 26 minutes
# and 3.2 GB, against streaming's 5-11 s and 0.5-0.7 GB at either size (experiments/
# data_pipeline, 32k sentencepiece, 2 busy cores). Below this, a few minutes once per corpus buy
# the cached stream's exact epochs and a restart that needs no TFDS.
STREAM_ABOVE_BYTES = 256 * 2**20


def _split_bytes(data_config, split: str) -> int | None:
  """The size of a split's text: our builders' from the files on disk (without TFDS), other
  TFDS datasets' from their recorded split info; None where not known before building."""
  if data_config.text_files:
    fraction = data_config.val_fraction if split == data_config.val_split else (
        1 - data_config.val_fraction)
    identity = _source_identity(data_config)['text_files']
    return int(sum(size for _, size, _ in identity) * fraction)
  if data_config.tfds_name == 'pydoc_topics':
    return 0  # CPython's documentation: a few MB
  split_info = tfds_builder(data_config).info.splits
  try:
    return split_info[split].num_bytes or None
  except KeyError:
    return None


def use_streaming(data_config) -> bool:
  """Whether the training split streams (data.streaming: 'auto', 'true' or 'false')."""
  mode = data_config.get('streaming', 'false')
  if mode in ('true', 'false'):
    return mode == 'true'
  if mode != 'auto':
    raise ConfigError(f"config.data.streaming must be 'auto', 'true' or 'false', got {mode!r}")
  size = _split_bytes(data_config, data_config.train_split)
  stream = size is None or size > STREAM_ABOVE_BYTES
  logging.info('data.streaming=auto: split %r holds %s bytes -> %s.', data_config.train_split,
               'an unknown number of' if size is None else size,
               'streaming' if stream else 'tokenized once into a cached stream')
  return stream


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def process_share(batch_size: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int]:
  """(process index, process count, rows per process); None means this JAX process's."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ConfigError(f'data.batch_size ({batch_size}) must be divisible by the number '
                     f'of processes ({process_count}).')
  return process_index, process_count, batch_size // process_count


def split_window(window: np.ndarray) -> dict[str, np.ndarray]:
  window = np.asarray(window, np.int32)
  return {'inputs': window[..., :-1], 'targets': window[..., 1:]}


def document_segments(inputs: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """{'segment_ids', 'positions'} of int[..., t] inputs: segment 1 from the first token, a new
  segment after each EOS, and positions counting from 0 within each."""
  starts = np.zeros(inputs.shape, bool)
  starts[..., 0] = True
  starts[..., 1:] = inputs[..., :-1] == eos_id
  index = np.broadcast_to(np.arange(inputs.shape[-1]), inputs.shape)
  segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
  return {'segment_ids': np.cumsum(starts, axis=-1, dtype=np.int32),
          'positions': (index - segment_start).astype(np.int32)}


def _window_to_row(data_config, tokenizer):
  """The cached mode's window of seq_len + 1 tokens -> a batch row (with document masking if
  asked)."""
  if not data_config.get('document_masking'):
    return split_window
  if tokenizer.eos_id is None:
    raise ConfigError('data.document_masking needs a tokenizer with an end-of-document token; '
                      f'data.tokenizer={data_config.tokenizer!r} has none.')

  def to_row(window):
    row = split_window(window)
    return {**row, **document_segments(row['inputs'], tokenizer.eos_id)}

  return to_row


def make_train_iterator(config, tokenizer: tokenizer_lib.Tokenizer, workdir: str,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's share of training batches."""
  data = config.data
  process_index, process_count, local_batch = process_share(data.batch_size, process_index,
                                                             process_count)
  to_row = _window_to_row(data, tokenizer)
  tokens = token_stream(data, tokenizer, workdir, data.train_split)
  window = data.seq_len + 1
  # Leave room to shift every window by up to `window - 1` tokens.
  num_windows = (len(tokens) - window + 1) // window
  if num_windows < 1:
    raise ConfigError(f'Split {data.train_split!r} has {len(tokens)} tokens: too few for one '
                     f'training window of data.seq_len + 1 = {window} tokens.')
  logging.info('Train split: %d tokens, %d windows of %d tokens; one epoch = %.1f steps.',
               len(tokens), num_windows, window, num_windows / data.batch_size)

  def read_window(index, window_number):
    epoch = index // num_windows
    offset = np.random.default_rng([config.seed, epoch]).integers(window)
    start = offset + window_number * window
    return to_row(tokens[start:start + window])

  ds = (
      grain.MapDataset.range(num_windows)
      .shuffle(seed=config.seed)
      .repeat()  # Endless; grain reshuffles each epoch with a seed derived from the epoch.
      .map_with_index(read_window)
      .batch(local_batch)
      # Global step s is local batches s * process_count ... + process_count - 1.
      .slice(slice(process_index, None, process_count))
  )
  # One background thread is plenty to slice windows from a memory-mapped array,
  # and keeps off the cores the training step needs.
  read_options = grain.ReadOptions(num_threads=1 if data.prefetch else 0,
                                   prefetch_buffer_size=data.prefetch)
  return iter(ds.to_iter_dataset(read_options))


def eval_batch_size(data_config) -> int:
  """Sequences per validation batch in training: a larger batch than the training one makes
  each evaluation cheaper per token."""
  return data_config.eval_batch_size or data_config.batch_size


def make_eval_batches(config, tokenizer: tokenizer_lib.Tokenizer, workdir: str,
                      num_batches: int, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of the validation split, in order, this process's rows."""
  data = config.data
  batch_size = eval_batch_size(data)
  process_index, process_count, local_batch = process_share(batch_size, process_index,
                                                             process_count)
  to_row = _window_to_row(data, tokenizer)
  tokens = token_stream(data, tokenizer, workdir, data.val_split)
  window = data.seq_len + 1
  available = len(tokens) // (batch_size * window)
  if available == 0:
    raise ConfigError(
        f'Split {data.val_split!r} has {len(tokens)} tokens: too few for one eval batch of '
        f'{batch_size} x (data.seq_len + 1) = {batch_size} x {window} tokens.')
  if available < num_batches:
    logging.warning('Split %r holds only %d of the %d eval batches asked for.',
                    data.val_split, available, num_batches)
  num_batches = min(num_batches, available)
  windows = tokens[:num_batches * batch_size * window].reshape(num_batches, batch_size, window)
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  return [to_row(batch[rows]) for batch in windows]
