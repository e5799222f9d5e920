"""The sweep runner and the report, on a 2-point sweep of a tiny config (real binaries)."""

import csv
import json
import os
import shlex

import pytest

from conftest import REPO, TINY, run_module
from gpt_jax import sweep
from gpt_jax.errors import ConfigError


def test_grid_helpers_and_names():
  grid = sweep.product({'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]})
  assert grid[1] == {'optim.lr': 1e-3, 'model.num_layers': 4} and len(grid) == 4
  zipped = sweep.zip({'model.num_layers': [2, 4], 'model.emb_dim': [64, 128]})
  assert zipped == [{'model.num_layers': 2, 'model.emb_dim': 64},
                    {'model.num_layers': 4, 'model.emb_dim': 128}]
  assert len(sweep.product(zipped, {'seed': [0, 1, 2]})) == 6
  with pytest.raises(ValueError):
    sweep.zip({'a': [1, 2]}, {'b': [1]})
  assert sweep.point_name({'optim.lr': 3e-4, 'model.num_layers': 6}) == 'lr=0.0003,num_layers=6'
  assert sweep.point_name({'model.vocab_size': 1, 'data.vocab_size': 2}) == (
      'model.vocab_size=1,data.vocab_size=2')
  assert sweep.point_name({'data.text_files': '/a b/*.txt'}) == 'text_files=_a_b_.txt'
  assert sweep.point_name({}) == 'base'


def test_unknown_key_fails_before_anything_runs():
  with pytest.raises(ConfigError, match='optim.learning_rate'):
    sweep.resolve_config('configs/default.py', {'optim.learning_rate': 1.0})
  config = sweep.resolve_config('configs/default.py', {'optim.lr': 0.5},
                                ['--config.train.num_steps=7', '--config.optim.lr=0.25'])
  assert config.train.num_steps == 7 and config.optim.lr == 0.25


def _steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [e['step'] for e in map(json.loads, f) if 'train_loss' in e]


def test_sweep_runs_skips_resumes_then_report(tmp_path, tfds_dir):
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(
      f'from gpt_jax import sweep\nBASE_CONFIG = {os.path.join(REPO, "configs/default.py")!r}\n'
      "def get_sweep():\n  return sweep.product({'optim.lr': [1e-3, 3e-3]})\n")
  root = tmp_path / 'runs'
  common = {**TINY, 'data.tfds_data_dir': tfds_dir, 'data.tokenizer': 'byte',
            'data.cache_dir': str(tmp_path / 'cache'), 'train.log_every': 1,
            'train.eval_every': 3, 'train.eval_batches': 2, 'optim.warmup_steps': 1}
  args = [f'--sweep={sweep_file}', f'--root={root}']
  args += [f'--config.{k}={v}' for k, v in common.items()] + ['--config.train.num_steps=6']

  dry = run_module('gpt_jax.sweep', *args, '--dry_run').stdout.splitlines()
  assert len(dry) == 2 and all(line.startswith('python -m gpt_jax.train ') for line in dry)
  assert f'--workdir={root}/lr=0.001 ' in dry[0] and '--config.optim.lr=0.003' in dry[1]
  assert not root.exists()

  # An interrupted point: the first one, stopped after 3 of its 6 steps.
  first = root / 'lr=0.001'
  run_module('gpt_jax.train', *shlex.split(dry[0])[3:-1], '--config.train.num_steps=3')
  assert _steps(first) == [1, 2, 3]

  out = run_module('gpt_jax.sweep', *args).stdout
  assert '[1/2] lr=0.001: python -m gpt_jax.train' in out and 'done' in out
  assert _steps(first) == [1, 2, 3, 4, 5, 6]  # resumed at step 4, not started over
  assert _steps(root / 'lr=0.003') == [1, 2, 3, 4, 5, 6]

  again = run_module('gpt_jax.sweep', *args).stdout
  assert again.count('finished, skipped') == 2, again
  assert _steps(first) == [1, 2, 3, 4, 5, 6]

  report_dir = tmp_path / 'report'
  printed = run_module('gpt_jax.report', f'--root={root}', f'--out={report_dir}').stdout
  assert '| run | optim.lr |' in printed
  with open(report_dir / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [row['run'] for row in table] == ['lr=0.001', 'lr=0.003']
  assert [float(row['optim.lr']) for row in table] == [1e-3, 3e-3]
  assert all(float(row['final_val_loss']) < 6 and int(row['step']) == 6 for row in table)
  for png in ('loss_curves.png', 'sweep_optim.lr.png'):
    with open(report_dir / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
