r"""Config sweeps: one workdir and one run of the real train binary per point.

  python -m gpt_jax.sweep --sweep=experiments/scaling/sweep.py --root=runs/scaling \
      [--dry_run] [--config.train.num_steps=100 ...]

A sweep file (`experiments/<name>/sweep.py`) defines

  BASE_CONFIG = 'configs/shakespeare_char.py'   # a config file, as `--config=` takes it
  def get_sweep():                              # one dict of config overrides per point
    return sweep.product({'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]})

BASE_CONFIG is a path relative to the sweep file's folder or, failing that, to the current
directory (the repository root); `path.py:arg` passes `arg` to `get_config`. `product` and `zip`
below make grids in one line.

Each point trains in `<root>/<name>`, the name made from its overrides
(`num_layers=4,lr=0.001`), by `python -m gpt_jax.train --config=BASE_CONFIG --workdir=...
--config.<key>=<value> ...`; `--config.x=y` flags given to this command are appended to every
point's command (so they win over the point's own values). Points run one after another. A point
whose metrics and checkpoint reach `train.num_steps` is skipped; any other point is (re)started,
and the train binary resumes it from its latest checkpoint, so rerunning the same command
finishes an interrupted sweep. `--dry_run` prints the commands instead, one per line, for a
cluster scheduler.

`<root>/sweep.json` records the points; `<workdir>/overrides.json` each point's overrides, which
`python -m gpt_jax.report --root=RUNS` reads to tabulate and plot the results.
"""

import ast
import builtins
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import app, flags

from gpt_jax import cli
from gpt_jax.errors import ConfigError

Point = dict[str, Any]
_MAX_NAME = 150  # characters of a workdir name; longer names are cut and given a hash

# ---------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------


def _points(part: Mapping[str, Sequence[Any]] | Iterable[Point], combine) -> list[Point]:
  """A list of points as is; a dict of {key: values} combined by `combine` (product or zip)."""
  if isinstance(part, Mapping):
    keys = list(part)
    return [dict(builtins.zip(keys, values)) for values in combine(*part.values())]
  return [dict(p) for p in part]


def _merge(points: Iterable[Point]) -> Point:
  merged = {}
  for point in points:
    clash = set(merged) & set(point)
    if clash:
      raise ValueError(f'Sweep axes set the same keys twice: {sorted(clash)}')
    merged.update(point)
  return merged


def product(*parts) -> list[Point]:
  """Every combination. A part is a list of points or a dict {key: values} (itself a product).

  product({'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]})  -> 4 points
  product(zip({'model.num_layers': [2, 4], 'model.emb_dim': [64, 128]}), {'seed': [0, 1]})
  """
  lists = [_points(p, itertools.product) for p in parts]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zip(*parts) -> list[Point]:  # pylint: disable=redefined-builtin
  """Points side by side. A part is a list of points or a dict {key: values} (itself zipped).

  zip({'model.num_layers': [2, 4, 6], 'model.emb_dim': [64, 128, 192]})  -> 3 points
  """
  lists = [_points(p, lambda *v: builtins.zip(*v, strict=True)) for p in parts]
  return [_merge(combo) for combo in builtins.zip(*lists, strict=True)]


# ---------------------------------------------------------------------------
# Points: names, values, commands
# ---------------------------------------------------------------------------


def format_value(value: Any) -> str:
  """A value as `--config.key=` takes it."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def point_name(point: Point) -> str:
  """A readable, filesystem-safe workdir name: `num_layers=4,lr=0.001` ('base' for {})."""
  if not point:
    return 'base'
  last = [key.rsplit('.', 1)[-1] for key in point]
  parts = []
  for key, short, value in builtins.zip(point, last, point.values()):
    label = short if last.count(short) == 1 else key  # full key when two end alike
    parts.append(f'{label}={format_value(value)}')
  name = re.sub(r'[^\w.=,+-]+', '_', ','.join(parts)).strip('._') or 'point'
  if len(name) > _MAX_NAME:
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()
    name = f'{name[:_MAX_NAME - 9]}-{digest[:8]}'
  return name


def train_command(base_config: str, workdir: str, point: Point,
                  extra_args: Sequence[str] = (), python: str = 'python') -> list[str]:
  return ([python, '-m', 'gpt_jax.train', f'--config={base_config}', f'--workdir={workdir}']
          + [f'--config.{key}={format_value(value)}' for key, value in point.items()]
          + list(extra_args))


# ---------------------------------------------------------------------------
# Sweep files and resolved configs
# ---------------------------------------------------------------------------


def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f'Cannot load {path!r} as a Python file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> tuple[str, list[Point]]:
  """(base config path as given to the train binary, points) of a sweep file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--sweep: no such file {path!r}')
  module = _load_module(path, 'gpt_jax_sweep_file')
  if not hasattr(module, 'BASE_CONFIG') or not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} must define BASE_CONFIG and get_sweep()')
  base = module.BASE_CONFIG
  file_part = base.split(':', 1)[0]
  beside = os.path.join(os.path.dirname(path), file_part)
  if not os.path.isabs(file_part) and os.path.isfile(beside):
    base = os.path.relpath(beside) + base[len(file_part):]
  elif not os.path.isfile(file_part):
    raise FileNotFoundError(f'BASE_CONFIG {base!r} of {path} is neither relative to the sweep '
                            'file nor to the current directory')
  points = [dict(p) for p in module.get_sweep()]
  if not points:
    raise ValueError(f'get_sweep() of {path} returned no points')
  names = [point_name(p) for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'Points of {path} share workdir names: {duplicates}')
  return base, points


def _parse_like(old: Any, text: str) -> Any:
  """`text` from a command line, converted to the type of the field's current value."""
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'expected a bool, got {text!r}')
    return text.lower() in ('true', '1')
  if isinstance(old, str):
    return text
  value = ast.literal_eval(text)
  return float(value) if isinstance(old, float) else value


def resolve_config(base_config: str, point: Point, extra_args: Sequence[str] = ()):
  """The config a point's run gets: base, then the point's overrides, then `extra_args`.

  Every key must exist in the base config: a misspelt key fails here, before any point runs.
  """
  path, _, arg = base_config.partition(':')
  module = _load_module(path, 'gpt_jax_base_config')
  config = module.get_config(arg) if arg else module.get_config()
  overrides = [(k, v, False) for k, v in point.items()]
  for flag in extra_args:
    match = re.fullmatch(r'--config\.([\w.]+)=(.*)', flag, re.S)
    if not match:
      raise ConfigError(f'Expected --config.<key>=<value>, got {flag!r}')
    overrides.append((match[1], match[2], True))
  for key, value, from_text in overrides:
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, 'get') else None
    if node is None or not hasattr(node, 'keys') or leaf not in node:
      raise ConfigError(cli.field_error(config, key, base_config))
    try:
      node[leaf] = _parse_like(node[leaf], value) if from_text else value
    except (TypeError, ValueError, SyntaxError) as e:
      raise ConfigError(f'Cannot set {key!r} of {base_config} to {value!r}: {e}') from None
  return config


def is_finished(workdir: str, num_steps: int) -> bool:
  """True when the run logged step `num_steps` and its checkpoint of that step exists."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(num_steps))):
    return False
  try:
    with open(metrics) as f:
      steps = [json.loads(line).get('step', -1) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError):
    return False
  return max(steps, default=-1) >= num_steps


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_sweep(sweep_file: str, root: str, extra_args: Sequence[str] = (), dry_run: bool = False,
              keep_going: bool = False) -> list[dict]:
  """Runs (or prints) every point of `sweep_file`; returns one status dict per point."""
  base, points = load_sweep(sweep_file)
  configs = [resolve_config(base, p, extra_args) for p in points]  # every key checked first
  statuses = []
  if dry_run:
    for point in points:
      workdir = os.path.join(root, point_name(point))
      print(shlex.join(train_command(base, workdir, point, extra_args)))
    return [{'name': point_name(p), 'status': 'printed'} for p in points]

  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'sweep.json'), 'w') as f:
    json.dump({'sweep': sweep_file, 'base_config': base, 'extra_args': list(extra_args),
               'points': [{'name': point_name(p), 'overrides': p} for p in points]},
              f, indent=2, default=str)
  failed = []
  for i, (point, config) in enumerate(builtins.zip(points, configs), 1):
    name = point_name(point)
    workdir = os.path.join(root, name)
    header = f'[{i}/{len(points)}] {name}'
    if is_finished(workdir, config.train.num_steps):
      print(f'{header}: finished, skipped', flush=True)
      statuses.append({'name': name, 'status': 'skipped'})
      continue
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'overrides.json'), 'w') as f:
      json.dump(point, f, indent=2, default=str)
    command = train_command(base, workdir, point, extra_args, python=sys.executable)
    print(f'{header}: {shlex.join(["python", *command[1:]])}', flush=True)
    start = time.perf_counter()
    returncode = subprocess.call(command)
    seconds = time.perf_counter() - start
    if returncode:
      print(f'{header}: failed (exit status {returncode}) after {seconds:.0f} s', flush=True)
      statuses.append({'name': name, 'status': 'failed', 'seconds': seconds})
      failed.append(name)
      if not keep_going:
        break
    else:
      print(f'{header}: done in {seconds:.0f} s', flush=True)
      statuses.append({'name': name, 'status': 'done', 'seconds': seconds})
  if failed:
    raise RuntimeError(f'Sweep points failed: {failed}; rerun the command to resume them')
  return statuses


def _define_flags() -> None:
  flags.DEFINE_string('sweep', None, 'A sweep file defining BASE_CONFIG and get_sweep().')
  flags.DEFINE_string('root', None, 'Folder holding one workdir per point.')
  flags.DEFINE_bool('dry_run', False, 'Print one train command per point; run nothing.')
  flags.DEFINE_bool('keep_going', False, 'Go on to the next point when one fails (default: stop).')


def _parse_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """absl flags for this binary; `--config.x=y` flags go through to the train binary."""
  passthrough = [a for a in argv[1:] if a.startswith('--config.')]
  rest = cli.parse_flags([argv[0]] + [a for a in argv[1:] if not a.startswith('--config.')])
  return passthrough, rest[1:]


def main(parsed: tuple[list[str], list[str]]):
  extra_args, unexpected = parsed
  if unexpected:
    raise app.UsageError(f'Unexpected arguments: {unexpected}')
  f = flags.FLAGS
  if f.sweep is None or f.root is None:
    raise app.UsageError('--sweep and --root are required')
  cli.quiet_logs()
  with cli.one_line_errors(ValueError, RuntimeError):
    run_sweep(f.sweep, f.root, extra_args, f.dry_run, f.keep_going)


if __name__ == '__main__':
  # Sweep files import gpt_jax.sweep: run that one copy of this module, not __main__.
  from gpt_jax import sweep as _this  # pylint: disable=import-self
  _this._define_flags()  # pylint: disable=protected-access
  app.run(_this.main, flags_parser=_this._parse_flags)  # pylint: disable=protected-access
