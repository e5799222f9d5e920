"""Metrics to `metrics.jsonl` (one JSON object per event) and TensorBoard, from process 0 only."""

import json
import os

import jax
import tensorboardX


class MetricWriter:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **metrics}) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
