"""What every gpt_jax binary does: one-line errors for user mistakes, quiet library logs."""

import contextlib
import sys

from absl import flags, logging

from gpt_jax.errors import ConfigError

_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of errors in the input.')


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
