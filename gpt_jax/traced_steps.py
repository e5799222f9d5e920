"""Steps saved traced, so that a restarted run does not trace them again.

JAX's persistent compilation cache skips compiling, but a restart still traces the step (runs
the model's Python) to find its cache key: 0.6-0.7 s of the baby config's 4 s restart on CPU.
`traced_once` saves the traced and lowered step with `jax.export` under a key computed without
tracing, from everything the traced program can depend on: the gpt_jax sources, the versions of
Python, jax, jaxlib, flax and optax, JAX's configuration and XLA_FLAGS, the run's whole config,
the devices and processes, and the arguments' shapes, dtypes and shardings. Any change makes a
new key (even of a logging option: the key errs on the safe side), so a stale program is never
run; a missing or unreadable file means tracing as usual.
The step runs from the exported program in the first run too, so that a restart finds it in the
compilation cache.

(Saving the compiled executable instead, `jax.experimental.serialize_executable`, would also
skip the cache lookup, but XLA:CPU re-serializes an executable read from the compilation cache
without its code: jaxlib 0.10.2 then fails with "Function ... not found" when it runs.)

The arguments' and results' pytrees are saved with the program, so they must be built from
dicts, lists and tuples (train.py passes the state as the list of its leaves).
"""

import functools
import glob
import hashlib
import json
import os
import sys

from absl import logging
import flax
import jax
import optax

from gpt_jax import files

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# JAX options that cannot change the compiled program.
_UNRELATED_OPTIONS = ('cache', 'log', 'dump', 'traceback', 'explain')


@functools.cache
def _sources_digest() -> str:
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(_PACKAGE_DIR, '**', '*.py'), recursive=True)):
    with open(path, 'rb') as f:
      digest.update(os.path.relpath(path, _PACKAGE_DIR).encode() + b'\0' + f.read())
  return digest.hexdigest()


def _environment() -> dict:
  options = {name: str(value) for name, value in jax.config.values.items()
             if not any(word in name for word in _UNRELATED_OPTIONS)}
  devices = [(d.id, d.process_index, d.device_kind) for d in jax.devices()]
  return {'sources': _sources_digest(), 'python': sys.version,
          'versions': [jax.__version__, jax.lib.__version__, flax.__version__, optax.__version__],
          'platform': [jax.default_backend(), jax.devices()[0].client.platform_version],
          'jax_options': options, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'devices': devices, 'process': [jax.process_index(), jax.process_count()]}


def step_key(name: str, config_json: str, args) -> str:
  """The key of `name` traced for `args` in a run with this config, here."""
  leaves, treedef = jax.tree.flatten(args)
  arguments = [str(treedef)] + [
      (str(jax.typeof(x)), str(getattr(x, 'sharding', None))) for x in leaves]
  identity = {'name': name, 'config': config_json, 'arguments': arguments, **_environment()}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def traced_once(jitted, args, directory: str, name: str, config_json: str, **jit_kwargs):
  """`jitted` (a jax.jit of `jit_kwargs`) for arguments like `args`, run from its exported
  program: read from `directory` when saved there under the same key, else traced and saved."""
  prefix = f'{name}-process{jax.process_index()}-'  # processes may see different shardings
  path = os.path.join(directory, prefix + step_key(name, config_json, args) + '.bin')
  exported = None
  if os.path.exists(path):
    try:
      with open(path, 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
      logging.info('Read the traced %s from %s', name, path)
    except Exception as e:  # pylint: disable=broad-except
      # Whatever the file holds (truncated, from an older jax), tracing again is correct.
      logging.warning('Could not read the traced %s from %s (%s); tracing it again.', name, path,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
  if exported is None:
    try:
      exported = jax.export.export(jitted)(*args)
    except Exception as e:  # pylint: disable=broad-except
      # e.g. a custom call that jax.export does not support: run it as usual.
      logging.warning('%s cannot be exported (%s): a restart will trace it again.', name,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
      return jitted
    _save(directory, prefix, path, exported)

  def run(*step_args):
    return exported.call(*step_args)

  run.__name__ = run.__qualname__ = name  # what logs and the compilation cache call it
  return jax.jit(run, **jit_kwargs)


def _save(directory: str, prefix: str, path: str, exported) -> None:
  try:
    serialized = exported.serialize()
    with files.written_whole(path, 'wb') as f:
      f.write(serialized)
    for old in glob.glob(os.path.join(directory, prefix + '*.bin')):
      if old != path:  # traced for an earlier config or version: never read again
        os.remove(old)
  except (OSError, ImportError, ValueError) as e:
    logging.warning('Could not save %s (%s): a restart will trace it again.', path, e)
