"""Streaming input: every process reads, tokenizes and packs its own share of the documents.

The cached mode (gpt_jax/data.py) tokenizes a whole split in one process before step 1; this
mode (`data.streaming`) starts at once and scales with the hosts:

1. Documents: the split's array_record records through `tfds.data_source`, visited in a
   global order shuffled from config.seed and reshuffled each epoch (grain's index
   permutation: no buffer, no pass over the corpus). Process p of n reads the documents at
   positions p, p + n, p + 2n, ... of that order and no others: together the processes read
   each document of an epoch exactly once.
2. Tokenized in `data.worker_count` grain worker processes (0: in the training process).
   Worker w takes every worker_count-th document and the main process takes their tokens
   back in turn, so the token stream does not depend on the number of workers.
3. Packed on the fly by grain's concat-then-split into windows of seq_len + 1 tokens, each
   document followed by EOS, no padding (a document longer than a window continues in the
   next). The windows are shuffled within a bounded buffer (`data.shuffle_buffer` windows) so
   that a batch's rows are not consecutive pieces of one document.
4. Batches: each process makes its own rows of the global batch, batch_size // process_count
   windows. With `data.document_masking`, rows also carry `segment_ids` (1, 2, ... per
   document piece) and `positions` restarting at 0 in each, so attention does not cross
   documents (the path packed chat batches take).

The iterator's `get_state()`/`set_state()` cover every stage, the workers included, and are
saved in each checkpoint: a resumed run reads exactly the batches it would have read (with the
same `data.worker_count`; the state holds one position per worker).
"""

import itertools

from absl import flags, logging
import grain
import numpy as np

from gpt_jax import data
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError


def prepare(data_config, split: str) -> None:
  """Builds the TFDS dataset's array_record files if they are not there yet (once, before
  the processes open it)."""
  data.open_texts(data_config, split)


class _Tokenize(grain.transforms.Map):
  """A TFDS example -> {'tokens': its token ids, then EOS}; runs in the worker processes."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key
    self._eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    # Small arrays cross from the workers: uint16 where the vocabulary fits.
    self._dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

  def map(self, example):
    text = example[self._text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    ids = self._tokenizer.encode(text) + self._eos if text else []
    return {'tokens': np.asarray(ids, self._dtype)}


def _source(data_config, split: str):
  builder = data.tfds_builder(data_config)
  if data_config.text_key not in builder.info.features:
    raise ConfigError(f'data.text_key {data_config.text_key!r} is not a feature of '
                      f'{builder.info.full_name}; it has {list(builder.info.features)}.')
  try:
    return builder.as_data_source(split=split)
  except (AssertionError, FileNotFoundError, ValueError) as e:
    raise ConfigError(f'{builder.info.full_name} split {split!r} cannot be read ({e}); it is '
                      'built by the first process of a run (gpt_jax.streaming.prepare).') from e


def _token_documents(config, tokenizer, split: str, shuffle: bool, process_index: int,
                     process_count: int, workers: int) -> grain.IterDataset:
  """{'tokens'} of this process's documents of `split`, in order (shuffled: endless)."""
  data_config = config.data
  documents = grain.MapDataset.source(_source(data_config, split))
  if shuffle:
    documents = documents.shuffle(seed=config.seed).repeat()  # reshuffled each epoch
  documents = documents[process_index::process_count].map(
      _Tokenize(tokenizer, data_config.text_key))
  # One reading thread per process: the workers are the parallelism, and within the training
  # process a thread keeps the reads off the step's critical path.
  tokens = documents.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; a program without absl (a script,
      # pytest) has not parsed them: take their defaults.
      flags.FLAGS.mark_as_parsed()
    tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=16))
  return tokens.filter(lambda document: len(document['tokens']) > 0)


class _RestoredFromJson(grain.DatasetIterator):
  """grain's concat-then-split iterator, whose state also restores after a JSON round trip
  (checkpoints store it as JSON): grain 0.2.18 tests its remainder slices against a tuple,
  (-1, -1) for none, which a JSON list never equals, and restores a remainder that isn't."""

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state({**state, 'remainder_slices': slices})


class _Windows(grain.IterDataset):
  """Windows of `window` tokens cut from the documents joined end to end (grain's
  concat-then-split), with its per-document `tokens_segment_ids` and `tokens_positions`
  (segment 0 marks the padding of the last window of a finite split)."""

  def __init__(self, documents: grain.IterDataset, window: int):
    super().__init__(grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={'tokens': window}, split_full_length_features=True))

  def __iter__(self):
    return _RestoredFromJson(self._parent.__iter__())


def _to_row(document_masking: bool):
  def to_row(packed):
    row = data.split_window(packed['tokens'])
    if document_masking:
      row['segment_ids'] = packed['tokens_segment_ids'][:-1].astype(np.int32)
      row['positions'] = packed['tokens_positions'][:-1].astype(np.int32)
    return row
  return to_row


def make_train_iterator(config, tokenizer: tokenizer_lib.Tokenizer,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's training batches, streamed."""
  data_config = config.data
  process_index, process_count, local_batch = data.process_share(
      data_config.batch_size, process_index, process_count)
  documents = _token_documents(config, tokenizer, data_config.train_split, True, process_index,
                               process_count, data_config.worker_count)
  rows = _Windows(documents, data_config.seq_len + 1)
  if data_config.shuffle_buffer > 1:
    rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=data_config.shuffle_buffer, seed=config.seed)
  batches = rows.map(_to_row(data_config.document_masking)).batch(local_batch)
  if data_config.prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=data_config.prefetch)
  logging.info('Streaming split %r: process %d of %d, %d tokenizer workers.',
               data_config.train_split, process_index, process_count, data_config.worker_count)
  return iter(batches)


def make_eval_batches(config, tokenizer: tokenizer_lib.Tokenizer, num_batches: int,
                      process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` global batches of the validation split, packed in document order
  as for training (no shuffling); this process's rows. Every process reads the same leading
  documents, only as many as the batches need, so the loss does not depend on the topology."""
  data_config = config.data
  batch_size = data.eval_batch_size(data_config)
  process_index, _, local_batch = data.process_share(
      batch_size, process_index, process_count)
  # A short read: not worth starting worker processes.
  documents = _token_documents(config, tokenizer, data_config.val_split, False, 0, 1, workers=0)
  full = _Windows(documents, data_config.seq_len + 1).filter(
      lambda packed: packed['tokens_segment_ids'][-1] > 0)  # the padded last window
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  batches = [{k: v[rows] for k, v in batch.items()} for batch in itertools.islice(
      full.map(_to_row(data_config.document_masking)).batch(batch_size, drop_remainder=True),
      num_batches)]
  if not batches:
    raise ConfigError(f'Split {data_config.val_split!r} is too small for one eval batch of '
                      f'{batch_size} x (data.seq_len + 1) = {batch_size} x '
                      f'{data_config.seq_len + 1} tokens.')
  if len(batches) < num_batches:
    logging.warning('Split %r holds only %d of the %d eval batches asked for.',
                    data_config.val_split, len(batches), num_batches)
  return batches
