"""Chat data for supervised fine-tuning: JSONL conversations -> packed, weighted batches.

1. Conversations are read from the JSONL files matching `data.chat_files` (format and template in
   gpt_jax/sft/chat_template.py). A malformed line is reported as `file:line: problem` and skipped
   or fatal, by `data.on_bad_lines` ('skip' | 'raise').
2. Each conversation is rendered to tokens; its example is inputs = tokens[:-1],
   targets = tokens[1:] and weights = 1 on the assistant's tokens and their end-of-turn marker
   (the loss is on those alone). A conversation longer than `data.seq_len + 1` tokens is cut
   to that length (`data.long_conversations='truncate'`, counted in one warning) or dropped
   ('drop'); one left with no assistant token to learn from is dropped either way.
3. Packing: grain's first-fit packing puts several conversations in each row of seq_len
   tokens. Each row carries `segment_ids` (1, 2, ... per conversation, 0 for padding) and
   `positions` restarting at 0 per conversation, so attention never crosses conversations and
   each is seen as if alone.

Training order: the conversations are shuffled (grain, from config.seed), repeated without end
(a fresh order each epoch) and packed. Like gpt_jax/data.py, the pipeline is a grain iterator
whose `get_state()`/`set_state()` save and restore its position: a resumed run reads exactly the
batches it would have read. Every process builds the same global batch and keeps its own rows.

Batches are numpy dicts of int32[batch_size // process_count, seq_len]:
{'inputs', 'targets', 'weights', 'segment_ids', 'positions'}.
"""

import dataclasses
import glob

from absl import logging
import grain
import jax
import numpy as np

from gpt_jax.sft import chat_template
from gpt_jax import data as text_data
from gpt_jax.errors import ConfigError

Example = dict[str, np.ndarray]


def chat_file_paths(pattern: str, field: str = 'data.chat_files') -> list[str]:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ConfigError(f'config.{field}={pattern!r} matches no file')
  return paths


def read_conversations(pattern: str, on_bad_lines: str = 'raise',
                       field: str = 'data.chat_files') -> list[list[chat_template.Message]]:
  """Every well-formed conversation of the files matching `pattern`, in file and line order."""
  conversations = []
  for path in chat_file_paths(pattern, field):
    conversations.extend(chat_template.read_conversations(
        path, on_error=on_bad_lines, skip_hint='--config.data.on_bad_lines=skip'))
  if not conversations:
    raise ConfigError(f'config.{field}={pattern!r} holds no usable conversation')
  return conversations


@dataclasses.dataclass
class EncodeStats:
  conversations: int = 0
  truncated: int = 0
  dropped: int = 0
  tokens: int = 0
  trained_tokens: int = 0  # targets with weight 1


def encode(tokenizer, conversations, seq_len: int, long_conversations: str = 'truncate'
           ) -> tuple[list[Example], EncodeStats]:
  """One example (inputs, targets, weights of up to seq_len tokens) per usable conversation."""
  if long_conversations not in ('truncate', 'drop'):
    raise ConfigError("config.data.long_conversations must be 'truncate' or 'drop', got "
                      f'{long_conversations!r}')
  examples, stats = [], EncodeStats()
  for number, messages in enumerate(conversations, start=1):
    stats.conversations += 1
    try:
      rendered = chat_template.render(tokenizer, messages)
    except chat_template.ConversationError as e:  # a tokenizer's own template may refuse one
      raise chat_template.ConversationError(f'conversation {number}: {e}') from None
    tokens, weights = rendered.tokens, rendered.weights
    if len(tokens) > seq_len + 1:
      if long_conversations == 'drop':
        stats.dropped += 1
        continue
      stats.truncated += 1
      tokens, weights = tokens[:seq_len + 1], weights[:seq_len + 1]
    if not any(weights[1:]):
      stats.dropped += 1  # nothing left to learn from (the assistant's turn was cut off)
      continue
    example = {'inputs': np.asarray(tokens[:-1], np.int32),
               'targets': np.asarray(tokens[1:], np.int32),
               'weights': np.asarray(weights[1:], np.int32)}
    stats.tokens += len(example['inputs'])
    stats.trained_tokens += int(example['weights'].sum())
    examples.append(example)
  if not examples:
    raise ConfigError(f'None of the {stats.conversations} conversations has an assistant token '
                      f'within data.seq_len={seq_len}')
  return examples, stats


def load_examples(config, tokenizer, pattern: str, field: str) -> list[Example]:
  conversations = read_conversations(pattern, config.data.on_bad_lines, field)
  examples, stats = encode(tokenizer, conversations, config.data.seq_len,
                           config.data.long_conversations)
  if stats.truncated or stats.dropped:
    logging.warning('%s: %d of %d conversations were longer than data.seq_len + 1 = %d tokens '
                    '(%d truncated, %d dropped).', pattern, stats.truncated + stats.dropped,
                    stats.conversations, config.data.seq_len + 1, stats.truncated, stats.dropped)
  logging.info('%s: %d conversations, %d tokens, %d of them trained on.', pattern,
               len(examples), stats.tokens, stats.trained_tokens)
  return examples


def _pack(ds: grain.IterDataset, seq_len: int, num_bins: int) -> grain.IterDataset:
  """Rows of seq_len tokens holding whole examples, with segment ids and positions."""
  lengths = {'inputs': seq_len, 'targets': seq_len, 'weights': seq_len}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False)

  def to_batch_row(row):
    return {'inputs': row['inputs'], 'targets': row['targets'], 'weights': row['weights'],
            'segment_ids': row['inputs_segment_ids'].astype(np.int32),
            'positions': row['inputs_positions'].astype(np.int32)}

  return packed.map(to_batch_row)


def _process_rows(batch_size: int, process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ConfigError(f'data.batch_size ({batch_size}) must be divisible by the number of '
                      f'processes ({process_count}).')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def make_train_iterator(config, tokenizer, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's rows of packed training batches."""
  data = config.data
  rows = _process_rows(data.batch_size, process_index, process_count)
  examples = load_examples(config, tokenizer, data.chat_files, 'data.chat_files')
  ds = (grain.MapDataset.source(examples)
        .shuffle(seed=config.seed)
        .repeat()  # grain reshuffles each epoch, with a seed derived from the epoch
        .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  ds = (_pack(ds, data.seq_len, num_bins=data.batch_size)
        .batch(data.batch_size)
        .map(lambda batch: {k: v[rows] for k, v in batch.items()}))
  return iter(ds)


def make_eval_batches(config, tokenizer, num_batches: int, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` packed batches of `data.val_chat_files`, in file order; the last one
  is filled with empty rows (weight 0)."""
  data = config.data
  batch_size = text_data.eval_batch_size(data)
  rows = _process_rows(batch_size, process_index, process_count)
  examples = load_examples(config, tokenizer, data.val_chat_files, 'data.val_chat_files')
  packed = list(_pack(grain.MapDataset.source(examples).to_iter_dataset(), data.seq_len,
                      num_bins=batch_size))
  empty = {k: np.zeros_like(v) for k, v in packed[0].items()}
  packed += [empty] * (-len(packed) % batch_size)
  batches = []
  for start in range(0, len(packed), batch_size):
    batch = {k: np.stack([row[k] for row in packed[start:start + batch_size]])
             for k in packed[0]}
    batches.append({k: v[rows] for k, v in batch.items()})
  if len(batches) > num_batches:
    logging.info('Evaluating on %d of the %d packed batches of %s.', num_batches, len(batches),
                 data.val_chat_files)
  return batches[:num_batches]
