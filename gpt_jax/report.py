r"""Tables and plots of a folder of runs (a sweep's root, or any folder of workdirs).

  python -m gpt_jax.report --root=runs/scaling [--out=experiments/scaling]

Every folder under --root holding `config.json` and `metrics.jsonl` is a run. Writes to --out
(default: --root):
  results.md, results.csv  one row per run: the config fields that differ between runs (a sweep's
                           overrides first), parameters, steps, final train and val loss, tokens/s
  loss_curves.png          train and validation loss against step, one colour per run
  sweep_<field>.png        final validation loss against each numeric field that varies
and prints the Markdown table. `collect(root)` returns the same rows to Python code.
"""

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from gpt_jax import cli

# Folders inside a workdir that never hold another run.
_NOT_RUNS = {'checkpoints', 'tensorboard', 'tokenizer', 'data_cache', 'corrupt_checkpoints'}
# Config fields that differ between runs without describing them.
_IGNORED_FIELDS = {'data.cache_dir', 'data.tfds_data_dir', 'init_from'}

# ---------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------


def find_runs(root: str) -> list[str]:
  """Workdirs under `root` (itself included), sorted by path."""
  runs = []
  for directory, subdirs, files in os.walk(root):
    if 'config.json' in files and 'metrics.jsonl' in files:
      runs.append(directory)
      subdirs[:] = []
    else:
      subdirs[:] = [d for d in subdirs if d not in _NOT_RUNS]
  return sorted(runs)


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return flat


def count_params(model_config: dict) -> tuple[int, int]:
  """(all parameters, non-embedding parameters: without the token and position embeddings).

  Only the fields that decide shapes are read, so that runs written by other gpt_jax versions
  count too; (nan, nan) when the model cannot be built.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gpt_jax import model  # pylint: disable=g-import-not-at-top
  cfg = model.ModelConfig.from_config(
      {k: v for k, v in model_config.items() if k in model.PARAMETER_FIELDS})
  try:
    shapes = jax.eval_shape(lambda: model.Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Cannot count the parameters of %s: %s', model_config, e)
    return float('nan'), float('nan')
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    size = math.prod(leaf.shape)
    total += size
    if str(getattr(path[0], 'key', path[0])) in ('wte', 'wpe'):
      embedding += size
  return total, total - embedding


def read_run(workdir: str) -> dict[str, Any]:
  """One run's config (flattened), overrides and summary metrics."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  events = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      if line.strip():
        events.append(json.loads(line))
  overrides = {}
  if os.path.exists(os.path.join(workdir, 'overrides.json')):
    with open(os.path.join(workdir, 'overrides.json')) as f:
      overrides = json.load(f)

  def curve(key):
    points = {}
    for e in events:
      if key in e:
        points[e['step']] = e[key]  # a resumed run may log a step twice: keep the latest
    return sorted(points.items())

  train, val = curve('train_loss'), curve('val_loss')
  speeds = [v for _, v in curve('tokens_per_s')]
  total, non_embedding = count_params(config['model'])
  num_steps = config['train']['num_steps']
  last_step = max((e['step'] for e in events), default=0)
  return {
      'workdir': workdir, 'config': flatten(config), 'overrides': overrides,
      'train_curve': train, 'val_curve': val,
      'step': last_step, 'num_steps': num_steps, 'finished': last_step >= num_steps,
      'tokens': last_step * config['data']['batch_size'] * config['data']['seq_len'],
      'params': total, 'non_embedding_params': non_embedding,
      'final_train_loss': train[-1][1] if train else float('nan'),
      'final_val_loss': val[-1][1] if val else float('nan'),
      'best_val_loss': min((v for _, v in val), default=float('nan')),
      # The first logged interval includes compilation.
      'tokens_per_s': statistics.median(speeds[1:] or speeds) if speeds else float('nan'),
  }


def varying_fields(runs: Sequence[dict]) -> list[str]:
  """Config fields whose values differ between runs: overridden keys first, in sweep order."""
  fields = []
  for run in runs:
    fields += [k for k in run['overrides'] if k not in fields]
  if len(runs) > 1:
    keys = sorted({k for run in runs for k in run['config']} - _IGNORED_FIELDS)
    for key in keys:
      values = {json.dumps(run['config'].get(key), sort_keys=True) for run in runs}
      if len(values) > 1 and key not in fields:
        fields.append(key)
  return fields


def collect(root: str) -> tuple[list[dict], list[str]]:
  """(one summary per run under `root`, the config fields that vary between them)."""
  runs = [read_run(w) for w in find_runs(root)]
  for run in runs:
    run['name'] = os.path.relpath(run['workdir'], root)
  return runs, varying_fields(runs)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

_COLUMNS = [('params', 'params'), ('non_embedding_params', 'non-emb params'),
            ('step', 'steps'), ('tokens', 'tokens'), ('final_train_loss', 'train loss'),
            ('final_val_loss', 'val loss'), ('best_val_loss', 'best val loss'),
            ('tokens_per_s', 'tokens/s')]


def _format(value: Any) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return ''
    return f'{value:.4f}' if abs(value) < 100 else f'{value:,.0f}'
  if isinstance(value, int) and not isinstance(value, bool):
    return f'{value:,}'
  return str(value)


def rows(runs: Sequence[dict], fields: Sequence[str]) -> list[dict[str, Any]]:
  out = []
  for run in runs:
    row = {'run': run['name']}
    row.update({f: run['config'].get(f) for f in fields})
    row.update({key: run[key] for key, _ in _COLUMNS})
    row['finished'] = run['finished']
    out.append(row)
  return out


def markdown_table(runs: Sequence[dict], fields: Sequence[str]) -> str:
  header = ['run', *fields, *(title for _, title in _COLUMNS)]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows(runs, fields):
    cells = [row['run'] + ('' if row['finished'] else ' (unfinished)')]
    cells += [_format(row[f]) for f in fields]
    cells += [_format(row[key]) for key, _ in _COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_csv(path: str, runs: Sequence[dict], fields: Sequence[str]) -> None:
  table = rows(runs, fields)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ['run'])
    writer.writeheader()
    writer.writerows(table)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_loss_curves(path: str, runs: Sequence[dict]) -> None:
  plt = _pyplot()
  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for i, run in enumerate(runs):
    color = plt.cm.viridis(i / max(len(runs) - 1, 1))
    if run['train_curve']:
      ax_train.plot(*zip(*run['train_curve']), color=color, lw=1, label=run['name'])
    if run['val_curve']:
      ax_val.plot(*zip(*run['val_curve']), color=color, lw=1.5, marker='o', ms=3,
                  label=run['name'])
  for ax, title in ((ax_train, 'train loss'), (ax_val, 'validation loss')):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  ax_train.set_ylabel('loss (nats / token)')
  ax_val.legend(fontsize=7, loc='upper right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _numeric(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_sweep(path: str, runs: Sequence[dict], field: str, others: Sequence[str]) -> None:
  """Final val loss against `field`; one line per combination of the `others` fields."""
  plt = _pyplot()
  groups: dict[tuple, list[tuple[float, float]]] = {}
  for run in runs:
    key = tuple((o, run['config'].get(o)) for o in others)
    groups.setdefault(key, []).append((run['config'][field], run['final_val_loss']))
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for i, (key, points) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
    points.sort()
    label = ', '.join(f'{o.rsplit(".", 1)[-1]}={v}' for o, v in key) or None
    ax.plot(*zip(*points), marker='o', color=f'C{i % 10}', label=label)
  values = [run['config'][field] for run in runs]
  if min(values) > 0 and max(values) / min(values) >= 10:
    ax.set_xscale('log')
  ax.set_xlabel(field)
  ax.set_ylabel('final validation loss')
  ax.grid(alpha=0.3, which='both')
  if len(groups) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(root: str, out: str | None = None) -> dict[str, str]:
  """Writes the tables and plots of the runs under `root`; returns {what: path}."""
  out = out or root
  runs, fields = collect(root)
  if not runs:
    raise FileNotFoundError(f'No runs (folders with config.json and metrics.jsonl) under {root}')
  os.makedirs(out, exist_ok=True)
  paths = {'markdown': os.path.join(out, 'results.md'), 'csv': os.path.join(out, 'results.csv'),
           'loss_curves': os.path.join(out, 'loss_curves.png')}
  table = markdown_table(runs, fields)
  with open(paths['markdown'], 'w') as f:
    f.write(table + '\n')
  write_csv(paths['csv'], runs, fields)
  plot_loss_curves(paths['loss_curves'], runs)
  numeric = [f for f in fields
             if all(_numeric(run['config'].get(f)) for run in runs)
             and len({run['config'][f] for run in runs}) > 1]
  for field in numeric:
    # The fields crossed with `field` (a product grid) split it into lines; fields that move
    # together with it (zipped sweep axes) do not.
    others = [o for o in fields if o != field and _crossed(runs, field, o)]
    paths[f'sweep_{field}'] = os.path.join(out, f'sweep_{field}.png')
    plot_sweep(paths[f'sweep_{field}'], runs, field, others)
  return paths


def _crossed(runs: Sequence[dict], field: str, other: str) -> bool:
  """True when every value of `field` occurs with every value of `other` (and both vary)."""
  key = lambda run, f: json.dumps(run['config'].get(f), sort_keys=True)
  pairs = {(key(run, field), key(run, other)) for run in runs}
  a, b = {p[0] for p in pairs}, {p[1] for p in pairs}
  return len(a) > 1 and len(b) > 1 and len(pairs) == len(a) * len(b)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.root is None:
    raise app.UsageError('--root is required')
  cli.quiet_logs()
  with cli.one_line_errors():
    paths = write_report(flags.FLAGS.root, flags.FLAGS.out)
  with open(paths['markdown']) as f:
    print(f.read(), end='')
  print('\n'.join(f'wrote {p}' for p in paths.values()))


if __name__ == '__main__':
  # Flags are defined here only, so that scripts importing this module may define their own.
  flags.DEFINE_string('root', None, 'Folder of runs (searched recursively).')
  flags.DEFINE_string('out', None, 'Output folder (default: --root).')
  app.run(main, flags_parser=cli.parse_flags)
