r"""Export a workdir's model for runtimes without gpt_jax: StableHLO (any XLA runtime) or ONNX.

  python -m gpt_jax.export --workdir=runs/default --format=stablehlo --out=runs/default_hlo \
      [--batch=1 --max_len=128] [--decode]
  python -m gpt_jax.export --workdir=runs/default --format=onnx --out=runs/default_onnx

The parameters of the latest (or --step) checkpoint are constants of the exported programs; the
shapes are fixed. The functions, the files and the manifest: gpt_jax/convert/export.py.
"""

from absl import app, flags

from gpt_jax import cli
from gpt_jax.errors import ConfigError
from gpt_jax.convert import export as exporting

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A gpt_jax workdir (trained, converted or pruned).')
  flags.DEFINE_enum('format', None, exporting.FORMATS, 'stablehlo or onnx.')
  flags.DEFINE_string('out', None, 'The directory to write.')
  flags.DEFINE_integer('batch', 1, 'Rows of every exported function.')
  flags.DEFINE_integer('max_len', 0, 'Tokens per row (0: the model\'s max_len).')
  flags.DEFINE_bool('decode', False, 'Also export prefill and decode_step.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors():
    if not FLAGS.workdir or not FLAGS.out or not FLAGS.format:
      raise ConfigError('--workdir, --format and --out are required')
    manifest = exporting.export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.batch,
                                FLAGS.max_len, FLAGS.decode, FLAGS.step)
  print(f"Wrote {FLAGS.out}: {', '.join(manifest['functions'])} ({FLAGS.format}, batch "
        f"{manifest['batch']} x {manifest['max_len']} tokens, step {manifest['step']})")


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
