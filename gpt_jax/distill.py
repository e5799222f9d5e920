r"""Distil a trained model (the teacher) into a student trained from scratch.

  python -m gpt_jax.distill --config=configs/distill.py --teacher=runs/default \
      --workdir=runs/student [--config.model.num_layers=2 --config.distill.temperature=2 ...]

The student has its own model fields (the config's) and the teacher's tokenizer and
vocabulary; it reads the teacher's corpus unless the config names one. It minimises
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy
(gpt_jax/compress/distillation.py; T and alpha in config.distill). The training loop is
gpt_jax/train.py's, with its flags: the same sharded step, checkpoints, exact resume, SIGTERM
handling and metrics.jsonl (distill_kl and train_ce beside train_loss; val_loss is the student's
cross-entropy). The teacher's parameters ride beside the state, sharded by the same rules, and
are never saved in the student's checkpoints.
"""

from absl import app, flags

from gpt_jax import cli, train
from gpt_jax.compress import distillation

FLAGS = flags.FLAGS


def configure(config) -> None:
  distillation.configure(config, FLAGS.teacher, FLAGS.workdir)
  distillation.copy_tokenizer(config.distill.teacher, FLAGS.workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.run(configure=configure, make_recipe=lambda config: train.Pretraining(
      distillation.Distillation.from_config(config)))


if __name__ == '__main__':
  train.define_flags()
  flags.DEFINE_string('teacher', None, 'Workdir of the trained teacher.')
  app.run(main, flags_parser=cli.parse_flags)
