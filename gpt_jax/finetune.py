r"""Fine-tune a pretrained model for chat (supervised, on conversations).

  python -m gpt_jax.finetune --config=configs/sft.py --init_from=runs/base --workdir=runs/sft \
      --config.data.chat_files='data/support_faq/train.jsonl' \
      [--config.data.val_chat_files='data/support_faq/heldout.jsonl'] \
      [--config.train.num_steps=300 --config.lora.rank=8]

The model (its parameter-shaping fields) and tokenizer come from `--init_from`, at its latest
checkpoint (recorded in the new workdir's config.json as `init_step`, so the run can be rebuilt).
The chat template's special tokens are added to the tokenizer, growing the embedding when the
base has no spare rows. The training loop is gpt_jax/train.py's, with its flags: the same
sharded step, checkpoints, resume, SIGTERM handling and metrics.jsonl. `lora.rank > 0` trains
adapters only, and the workdir's checkpoints hold only them; `lora.rank=0` trains every
parameter.
"""

import os

from absl import app, flags

from gpt_jax import checkpoint, cli, train
from gpt_jax.errors import ConfigError

_INIT_FROM = flags.DEFINE_string('init_from', None, 'Workdir of the pretrained model.')

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


def main(argv):
  train.main(argv, configure=lambda config: configure(config, _INIT_FROM.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
