r"""Structured pruning: remove whole attention heads and MLP units, write a smaller dense model.

  python -m gpt_jax.prune --workdir=runs/default --out=runs/pruned --heads_per_layer=2 \
      --mlp_dim=256 [--criterion=magnitude|activation] [--step=N]

Every layer keeps its `heads_per_layer` most important query heads and `mlp_dim` most important
MLP units (gpt_jax/compress/pruning.py says how importance is measured); the output is a plain
workdir that sample, eval, serve, export, convert and fine-tuning load.
"""

from absl import app, flags

from gpt_jax import cli
from gpt_jax.errors import ConfigError
from gpt_jax.compress import pruning

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'The workdir to prune.')
  flags.DEFINE_string('out', None, 'The new workdir to write.')
  flags.DEFINE_integer('heads_per_layer', 0, 'Query heads each layer keeps (0: all).')
  flags.DEFINE_integer('mlp_dim', 0, 'MLP units each layer keeps (0: all).')
  flags.DEFINE_enum('criterion', 'magnitude', pruning.CRITERIA, 'How heads and units are ranked.')
  flags.DEFINE_integer('batches', 4, 'Validation batches for --criterion=activation.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors():
    if not FLAGS.workdir or not FLAGS.out:
      raise ConfigError('--workdir and --out are required')
    if FLAGS.heads_per_layer < 0 or FLAGS.mlp_dim < 0 or FLAGS.batches <= 0:
      raise ConfigError('--heads_per_layer and --mlp_dim must be >= 0 (0: keep all), '
                        '--batches positive')
    result = pruning.prune_workdir(FLAGS.workdir, FLAGS.out, FLAGS.heads_per_layer, FLAGS.mlp_dim,
                                   FLAGS.criterion, FLAGS.batches, FLAGS.step)
  print(f"Wrote {FLAGS.out} (step {result['step']}): {result['num_heads']} heads and "
        f"{result['mlp_dim']} MLP units per layer, {result['params_before'] / 1e6:.3f}M -> "
        f"{result['params_after'] / 1e6:.3f}M parameters ({FLAGS.criterion})")


if __name__ == '__main__':
  define_flags()
  app.run(main)
