"""What a cleaning run did, from the datatrove stats its tasks saved: OUT/report.json and a table.

Each completed task of a stage leaves OUT/work/logs/<stage>/stats/<rank>.json (one entry per
pipeline step); summing them over the tasks gives the stage's counts also for a run that was
killed and resumed, where no single invocation saw every task.
"""

import collections
import glob
import json
import os

from datatrove.pipeline.dedup import ExactDedupFilter, MinhashDedupFilter
from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LambdaFilter)
from datatrove.utils.stats import PipelineStats
from datatrove.utils.typeshelper import ExtensionHelperSD
import numpy as np

# The steps that remove documents, by the names datatrove gives their stats.
_REMOVERS = {GopherQualityFilter.name: 'gopher', C4QualityFilter.name: 'c4',
             GopherRepetitionFilter.name: 'repetition', LambdaFilter.name: 'empty',
             ExactDedupFilter.name: 'exact', MinhashDedupFilter.name: 'minhash'}


def stage_stats(logs: str, stage: str) -> list[dict]:
  """The summed stats of each step of `stage`: [{'name', 'time_stats', 'stats'}, ...]."""
  total = PipelineStats()
  for path in sorted(glob.glob(os.path.join(logs, stage, 'stats', '*.json'))):
    with open(path) as f:
      total += PipelineStats.from_json(json.load(f))
  return [step.to_dict() for step in total.stats]


def _count(stats: dict, key: str) -> int:
  value = stats.get(key, 0)
  return int(value['total'] if isinstance(value, dict) else value)


def _doc_chars(stats: dict) -> tuple[int, int]:
  """(documents, characters) from a step's doc_len stat."""
  value = stats.get('doc_len', 0)
  if isinstance(value, dict):
    return int(value.get('n', value['total'])), int(value['total'])
  return (1, int(value)) if value else (0, 0)


def _histogram(sizes) -> dict[str, int]:
  return {str(size): count for size, count in sorted(collections.Counter(sizes).items())}


def exact_cluster_sizes(out: str) -> dict[str, int]:
  """From datatrove's exact-dedup counts: (kept document, copies removed) per cluster."""
  sizes = []
  pattern = os.path.join(out, 'work', 'exact', 'duplicates', '*', '*' + ExtensionHelperSD.stage_2_counts)
  for path in glob.glob(pattern):
    counts = np.fromfile(path, dtype=[('doc', '<u4'), ('count', '<u4')])['count']
    sizes += (counts.astype(int) + 1).tolist()
  return _histogram(sizes)


def minhash_cluster_sizes(out: str) -> dict[str, int]:
  """From datatrove's MinHash cluster sizes: (document, size of its cluster) per member."""
  members = []
  for path in glob.glob(os.path.join(out, 'work', 'minhash', 'remove_ids', '*.sizes')):
    members += np.fromfile(path, dtype=[('doc', '<u4'), ('size', '<u4')])['size'].tolist()
  return {size: count // int(size) for size, count in _histogram(members).items()}


def build(out: str, stage_seconds: dict[str, float] | None = None) -> dict:
  """The report of the run writing into `out`."""
  logs = os.path.join(out, 'work', 'logs')
  filter_steps = stage_stats(logs, 'filter')
  write_steps = stage_stats(logs, 'write')
  docs_in, chars_in = _doc_chars(filter_steps[0]['stats']) if filter_steps else (0, 0)
  removed, reasons = {}, {}
  # Filters from the filter stage; dedup from the write stage (exact runs twice).
  for step in filter_steps + write_steps[1:]:
    name = next((short for step_name, short in _REMOVERS.items()
                 if step['name'].endswith(step_name)), None)
    if name is None or (name == 'exact' and step in filter_steps):
      continue
    removed[name] = _count(step['stats'], 'dropped')
    why = {key[len('dropped_'):]: _count(step['stats'], key) for key in step['stats']
           if key.startswith('dropped_')}
    if why:
      reasons[name] = why
  docs_out, chars_out = _doc_chars(write_steps[-1]['stats']) if write_steps else (0, 0)
  clusters = {'exact': exact_cluster_sizes(out), 'minhash': minhash_cluster_sizes(out)}
  report = {
      'documents_in': docs_in, 'characters_in': chars_in,
      'documents_out': docs_out, 'characters_out': chars_out,
      'removed': removed, 'removed_why': reasons,
      'cluster_sizes': clusters,  # {documents in a cluster: clusters of that size}
  }
  if stage_seconds is not None:  # wall time of each stage in this invocation (local, ray)
    report['stage_seconds'] = stage_seconds
    report['wall_seconds'] = round(sum(stage_seconds.values()), 2)
  return report


def write(out: str, report: dict) -> str:
  path = os.path.join(out, 'report.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  return path


def table(report: dict) -> str:
  """The report as a few lines of text."""
  lines = [f'{"stage":<12}{"removed":>10}{"documents left":>16}']
  left = report['documents_in']
  lines.append(f'{"input":<12}{"":>10}{left:>16,}')
  for name, count in report['removed'].items():
    left -= count
    why = report['removed_why'].get(name)
    detail = '  (' + ', '.join(f'{k} {v:,}' for k, v in sorted(why.items(), key=lambda kv: -kv[1])[:3]) + ')' if why else ''
    lines.append(f'{name:<12}{count:>10,}{left:>16,}{detail}')
  chars_in, chars_out = report['characters_in'], report['characters_out']
  lines.append(f'output: {report["documents_out"]:,} of {report["documents_in"]:,} documents, '
               f'{chars_out:,} of {chars_in:,} characters ({chars_out / max(chars_in, 1):.1%})')
  for name, sizes in report['cluster_sizes'].items():
    if sizes:
      shown = ', '.join(f'{count:,} of {size}' for size, count in list(sizes.items())[:6])
      lines.append(f'{name} duplicate clusters: {sum(sizes.values()):,} ({shown}'
                   f'{", ..." if len(sizes) > 6 else ""}; largest {max(map(int, sizes))})')
  if 'wall_seconds' in report:
    stages = ', '.join(f'{k} {v:.1f}' for k, v in report['stage_seconds'].items())
    lines.append(f'time: {report["wall_seconds"]:.1f} s ({stages})')
  return '\n'.join(lines)


class ReportStep:
  """The last stage's pipeline: writes OUT/report.json where the stages ran (any executor)."""

  def __init__(self, out: str):
    self.out = out

  def __call__(self, data, rank: int = 0, world_size: int = 1):
    del data, rank, world_size
    write(self.out, build(self.out))
    return []
