"""Chat fine-tuning as a recipe for gpt_jax/train.py's loop.

Against pretraining it changes four things: the tokenizer is the base's with the chat template's
special tokens added; the embedding grows when the base has no spare rows for them (with LoRA
and lora.train_chat_tokens, those rows train beside the adapters: checkpoint.trainable_params);
batches are packed conversations (gpt_jax/sft/chat_data.py) carrying 'weights', 'segment_ids'
and 'positions', so that only the assistant's tokens are trained on; and the end-of-run sample
is a user's turn, answered until the end of the turn.
"""

import os
import sys

from absl import app

from gpt_jax import checkpoint, train
from gpt_jax import lora as lora_lib
from gpt_jax.errors import ConfigError
from gpt_jax.sft import chat_data, chat_template

# Model fields that belong to this run rather than to the pretrained weights.
RUN_FIELDS = ('dropout', 'remat', 'compute_dtype')


def configure(config, init_from: str) -> None:
  """Sets `init_from` and copies the base's model fields (but RUN_FIELDS) into `config`."""
  if not init_from:
    raise app.UsageError('--init_from is required')
  base = checkpoint.load_config(init_from)
  config.init_from = os.path.abspath(init_from)
  for field, value in base.model.items():
    if field not in RUN_FIELDS:
      config.model[field] = value
  config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  if not config.data.chat_files:
    raise ConfigError('Set --config.data.chat_files to a glob of chat JSONL files')


class FineTuning(train.Pretraining):
  """Supervised fine-tuning on conversations, from config.init_from's parameters."""

  def prepare_tokenizer(self, config, workdir: str):
    tokenizer = super().prepare_tokenizer(config, workdir)  # the base's
    if not chat_template.has_chat_tokens(tokenizer):
      tokenizer = chat_template.add_chat_tokens(tokenizer)
      tokenizer.save(os.path.join(workdir, 'tokenizer'))
    return tokenizer

  def vocab_size(self, config, tokenizer, is_main: bool) -> int:
    """The base's rows; when the tokenizer has more, the embedding grows (rounded up to
    data.vocab_multiple), with a warning."""
    vocab_size = config.model.vocab_size
    if vocab_size == 0 or vocab_size >= tokenizer.vocab_size:
      return vocab_size or tokenizer.vocab_size  # a base's spare rows take the new tokens
    grown = lora_lib.round_up(tokenizer.vocab_size, config.data.vocab_multiple)
    if is_main:
      print(f'warning: the tokenizer has {tokenizer.vocab_size} tokens, more than the '
            f'{vocab_size} embedding rows of {config.init_from}: the embedding grows to {grown} '
            'rows (a multiple of data.vocab_multiple), the new ones set to the mean of the old.',
            file=sys.stderr, flush=True)
    return grown

  def batches(self, config, tokenizer, workdir: str, is_main: bool):
    evaluated = config.train.eval_every and config.data.val_chat_files
    return (chat_data.make_train_iterator(config, tokenizer),
            chat_data.make_eval_batches(config, tokenizer, config.train.eval_batches)
            if evaluated else [])

  def sample_prompt(self, tokenizer, text: str) -> tuple[list[int], int]:
    turn = {'role': 'user', 'content': text}
    return (chat_template.render(tokenizer, [turn], add_generation_prompt=True).tokens,
            chat_template.end_of_turn_id(tokenizer))
