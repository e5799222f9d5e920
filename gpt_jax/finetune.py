r"""Fine-tune a pretrained model for chat (supervised, on conversations).

  python -m gpt_jax.finetune --config=configs/sft.py --init_from=runs/base --workdir=runs/sft \
      --config.data.chat_files='data/support_faq/train.jsonl' \
      [--config.data.val_chat_files='data/support_faq/heldout.jsonl'] \
      [--config.train.num_steps=300 --config.lora.rank=8]

The model (its parameter-shaping fields) and tokenizer come from `--init_from`, at its latest
checkpoint (recorded in the new workdir's config.json as `init_step`, so the run can be rebuilt).
The chat template's special tokens are added to the tokenizer, growing the embedding when the
base has no spare rows (gpt_jax/sft/finetuning.py). The training loop is gpt_jax/train.py's,
with its flags: the same sharded step, checkpoints, resume, SIGTERM handling and metrics.jsonl.
`lora.rank > 0` trains adapters only, and the workdir's checkpoints hold only them;
`lora.rank=0` trains every parameter.
"""

from absl import app, flags

from gpt_jax import cli, train
from gpt_jax.sft import finetuning

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.run(configure=lambda config: finetuning.configure(config, FLAGS.init_from),
            make_recipe=lambda config: finetuning.FineTuning())


if __name__ == '__main__':
  train.define_flags()
  flags.DEFINE_string('init_from', None, 'Workdir of the pretrained model.')
  app.run(main, flags_parser=cli.parse_flags)
