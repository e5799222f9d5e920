"""What every gpt_jax binary does: one-line errors for user mistakes, quiet library logs, and
for the binaries that run whole models on the CPU, freed host memory kept."""

import contextlib
import sys

from absl import flags, logging

from gpt_jax.errors import ConfigError

_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of errors in the input.')
_KEEP_FREED_HOST_MEMORY = flags.DEFINE_bool(
    'keep_freed_host_memory', True, 'gpt_jax.train, finetune and eval on CPU (Linux, glibc): '
    'keep freed memory in the process rather than returning it to the system, so that XLA '
    'does not fault in each step\'s temporary buffer afresh (gpt_jax/host_memory.py).')


def define_mesh_flag() -> None:
  """--mesh, for the binaries that run a trained model (sample, chat, eval, serve)."""
  flags.DEFINE_string(
      'mesh', '', 'Devices as DATAxFSDPxTENSOR sizes, e.g. 1x1x8 (one may be -1): parameters '
      'load straight into their shards, and the KV cache and batch split like the activations. '
      'Default: the training config\'s mesh where it fits the devices, else all on data.')


def keep_freed_host_memory() -> None:
  """Unless --keep_freed_host_memory=false; call before anything starts JAX."""
  if _KEEP_FREED_HOST_MEMORY.value:
    # Imported here: host_memory imports jax, which gpt_jax.report and gpt_jax.sweep never load.
    from gpt_jax import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.keep_freed_memory()


def skip_absent_tpu() -> None:
  """For the binaries that run JAX: no attempt to start an installed libtpu on a host without
  TPU chips (gpt_jax/target.py). Call before anything starts JAX."""
  from gpt_jax import target  # pylint: disable=import-outside-toplevel  (imports jax)
  target.skip_absent_tpu()


def quiet_logs(level=logging.WARNING) -> None:
  """Hides libraries' INFO logs (Orbax logs every save) unless --verbosity was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(level)


@contextlib.contextmanager
def one_line_errors(*more: type[Exception]):
  """A ConfigError or FileNotFoundError (or one of `more`) ends the program with one line,
  `error: <message>`, and exit code 1; --verbose shows the traceback instead."""
  try:
    yield
  except (ConfigError, FileNotFoundError, *more) as e:
    if _VERBOSE.value:
      raise
    sys.exit(f'error: {e}')
