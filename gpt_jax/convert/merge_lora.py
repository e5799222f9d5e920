r"""Fold a LoRA fine-tuning run's adapters into its base: a plain workdir, for sampling or export.

  python -m gpt_jax.convert.merge_lora --workdir=runs/sft --out=runs/sft_merged
  python -m gpt_jax.sample --workdir=runs/sft_merged

`--out` gets `config.json` (the run's, without adapters or a base to depend on), `tokenizer/`
(with the chat tokens) and `checkpoints/<step>/` holding every parameter, each target kernel
W replaced by W + (alpha / rank) A B. Its logits equal those of the base with the adapters.
A workdir without adapters (full fine-tuning, pretraining) is copied as it is, minus the
optimizer state.
"""

import os
import shutil

from absl import app, flags

from gpt_jax import checkpoint, cli

FLAGS = flags.FLAGS


def merge(workdir: str, out: str, step: int | None = None) -> int:
  """Writes the merged workdir `out`; returns the step merged."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir} is not a directory')
  if os.path.exists(os.path.join(out, checkpoint.CHECKPOINT_DIR)):
    raise FileExistsError(f'--out {out} already holds checkpoints; choose a new directory')
  model_cfg, params, step = checkpoint.load_model(workdir, step)
  config = checkpoint.load_config(workdir)
  config.model.scan_layers = model_cfg.scan_layers  # load_model returns per-layer parameters
  if 'lora' in config:
    config.lora.rank = 0
  config.init_from, config.init_step = '', -1  # self-contained: no base to read
  os.makedirs(out, exist_ok=True)
  shutil.copytree(os.path.join(workdir, 'tokenizer'), os.path.join(out, 'tokenizer'),
                  dirs_exist_ok=True)
  checkpoint.save_config(out, config)
  checkpoint.save_params(out, step, params)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors(FileExistsError):
    step = merge(FLAGS.workdir, FLAGS.out, FLAGS.step)
  print(f'Merged {FLAGS.workdir} (step {step}) into {FLAGS.out}')


if __name__ == '__main__':
  # Flags defined here only, so that importing the module defines none.
  flags.DEFINE_string('workdir', None, 'A workdir fine-tuned with LoRA (gpt_jax.finetune).')
  flags.DEFINE_string('out', None, 'The plain workdir to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  app.run(main)
