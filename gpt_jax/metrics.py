"""Metrics to `metrics.jsonl` (one JSON object per event) and TensorBoard, from process 0 only."""

import functools
import json
import os
import sys

import jax

from gpt_jax import files


class MetricsWriteError(OSError):
  """metrics.jsonl or the TensorBoard events could not be written (e.g. the disk is full)."""


def _raising_metrics_write_error(method):
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except OSError as e:
      raise MetricsWriteError(
          f'Writing metrics to {self.workdir} failed: {e.strerror or e}.') from e
  return wrapper


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    """Appends to metrics.jsonl, first dropping events after `resume_step`: a run killed after
    its last checkpoint logs those steps again when it resumes. tensorboard: also write event
    files to <workdir>/tensorboard."""
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if os.path.exists(path):
        kept = [row for row in read_metrics(workdir) if row['step'] <= resume_step]
        with files.written_whole(path) as f:
          f.writelines(json.dumps(row) + '\n' for row in kept)
      self._jsonl = open(path, 'a')
      self._tensorboard = None
      if tensorboard:
        self._tensorboard = _import_tensorboardx().SummaryWriter(
            os.path.join(workdir, 'tensorboard'))

  @_raising_metrics_write_error
  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items() if self._tensorboard else ():
      self._tensorboard.add_scalar(name, value, step)

  @_raising_metrics_write_error
  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tensorboard:
        self._tensorboard.close()


def _import_tensorboardx():
  """tensorboardX imports torch where it is installed, only for type hints: about 2 s of every
  run's start-up (bench_startup.py). Unless torch is already loaded, that import is made to fail
  while it loads."""
  if 'torch' in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError
  try:
    import tensorboardX
  finally:
    del sys.modules['torch']
  return tensorboardX


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    # A line cut short by a kill is dropped.
    rows = []
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
    return rows
