"""What every gpt_jax binary does: one-line errors for user mistakes (a misspelt flag or config
field named with its closest known name), quiet library logs, and for the binaries that run
whole models on the CPU, freed host memory kept."""

import contextlib
import difflib
import functools
import os
import re
import sys

from absl import flags, logging
import ml_collections

from gpt_jax.errors import ConfigError

_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of errors in the input.')
_KEEP_FREED_HOST_MEMORY = flags.DEFINE_bool(
    'keep_freed_host_memory', True, 'gpt_jax.train, finetune and eval on CPU (Linux, glibc): '
    'keep freed memory in the process rather than returning it to the system, so that XLA '
    'does not fault in each step\'s temporary buffer afresh (gpt_jax/backends/cpu/host_memory.py).')


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
    from gpt_jax.backends.cpu import host_memory  # pylint: disable=import-outside-toplevel
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
  """A ConfigError or FileNotFoundError (or one of `more`), or a library of an extra that is not
  installed, ends the program with one line, `error: <message>`, and exit code 1; --verbose
  shows the traceback instead."""
  try:
    yield
  except (ConfigError, FileNotFoundError, *more) as e:
    if _VERBOSE.value:
      raise
    sys.exit(f'error: {e}')
  except ImportError as e:
    # A library's own message may wrap the missing module (jax.export's, for flatbuffers).
    package = (e.name or getattr(e.__cause__, 'name', None) or '').split('.')[0]
    extra = EXTRAS.get(package)
    if extra is None or _VERBOSE.value:
      raise
    sys.exit(f"error: {package} is not installed; it comes with gpt_jax's [{extra}] extra: "
             f"pip install -e '.[{extra}]'")


# What the optional libraries come with (setup.cfg's extras_require).
EXTRAS = {'fastapi': 'serve', 'uvicorn': 'serve', 'pydantic': 'serve', 'starlette': 'serve',
          'sacrebleu': 'eval', 'rouge_score': 'eval', 'nltk': 'eval',
          'matplotlib': 'report', 'scipy': 'report', 'libtpu': 'tpu',
          'onnx': 'export', 'onnxruntime': 'export', 'onnxscript': 'export', 'torch': 'export',
          'transformers': 'export', 'flatbuffers': 'export', 'datatrove': 'clean',
          'orjson': 'clean'}


# -------------------------------------------------------------------- flags and config fields


def config_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted path of `config`: its groups and their fields ('train', 'train.num_steps')."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths += config_paths(value, f'{prefix}{key}.')
  return paths


def closest(name: str, known, prefix: str = '') -> str:
  """' (did you mean PREFIX+X?)' for the known name X closest to `name`; '' when none is close."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f' (did you mean {prefix}{match[0]}?)' if match else ''


def field_error(config: ml_collections.ConfigDict, key: str,
                source: str = 'the config') -> str | None:
  """None when the dotted `key` ('train.num_steps') names a field of `config`; otherwise one
  sentence naming the first part that is not a field, with the closest known path."""
  node, parts = config, key.split('.')
  for i, part in enumerate(parts):
    here = '.'.join(parts[:i + 1])
    if not isinstance(node, ml_collections.ConfigDict):
      return f"config.{'.'.join(parts[:i])} is a value, not a group of fields"
    if part not in node:
      paths = config_paths(config)
      suggestion = closest(key, paths, 'config.') or closest(here, paths, 'config.')
      return f'config.{here} is not a field of {source}{suggestion}'
    node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's `flags_parser`), with every mistake in a flag or a
  `--config.` override ending the program with one line: `error: <message>`, exit code 1.
  An unknown flag or config field is named with the closest known name."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_error(argv, e)
    if message is None or '--verbose' in argv:
      raise
    sys.exit(f'error: {message}')


def _flag_error(argv: list[str], error: Exception) -> str | None:
  """The one-line message for a flag parsing error, or None for an error of another kind (one in
  a config file's own code, shown with its traceback)."""
  if isinstance(error, flags.UnrecognizedFlagError):
    name = error.flagname
    if name.startswith('config.'):  # the override of a field when --config was not given
      return f'--{name} overrides a field of --config, which was not given'
    return f'unknown flag --{name}{closest(name, _own_flags(), "--")}'
  config_file = next((arg.split('=', 1)[1] for arg in reversed(argv[1:])
                      if arg.startswith('--config=')), None)
  config = _load_config(config_file) if config_file and 'config' in flags.FLAGS else None
  if isinstance(error, (KeyError, AttributeError)) and config is not None:
    for arg in argv[1:]:
      if match := re.match(r'--(?:no)?config\.([\w.]+)', arg):
        problem = field_error(config, match[1], config_file)
        if problem:
          return problem
  if isinstance(error, flags.IllegalFlagValueError):
    message = str(error).removeprefix('flag ')  # '--name=value: why'
    match = re.fullmatch(r'--config\.([\w.]+)=(.*?): .*', message, re.S)
    if match and config is not None and field_error(config, match[1]) is None:
      old = functools.reduce(lambda node, part: node[part], match[1].split('.'), config)
      kind = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}
      return f'config.{match[1]} takes {kind.get(type(old), type(old).__name__)}, got {match[2]!r}'
    return message
  return None


def _own_flags() -> list[str]:
  """The binary's flags, without absl's own (--only_check_args, --logtostderr, ...)."""
  return [flag.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
          if not module.startswith('absl.') for flag in defined]


def _load_config(path: str) -> ml_collections.ConfigDict | None:
  """The config that `--config=path` loads, before any override."""
  config = flags.FLAGS['config'].parser.parse(path)
  return config if isinstance(config, ml_collections.ConfigDict) else None


def check_generation_flags(f) -> None:
  """The flags sample and chat share: workdir, max_new_tokens and the sampling settings."""
  if not f.workdir:
    raise ConfigError('--workdir is required')
  if f.max_new_tokens <= 0:
    raise ConfigError(f'--max_new_tokens must be positive, got {f.max_new_tokens}')
  # Imported here: sweep and report, which import cli, need no jax.
  from gpt_jax import decode  # pylint: disable=import-outside-toplevel
  try:
    decode.check_sampling(f.temperature, f.top_k, f.top_p, f.repetition_penalty)
  except ConfigError as e:
    raise ConfigError(f'--{e}') from None
  if not os.path.isdir(f.workdir):
    raise FileNotFoundError(f'Workdir {f.workdir} does not exist')
