r"""Distillation on character-level tiny Shakespeare: teacher, student from scratch, student
distilled; the same steps and data, 3 seeds each, whole-split validation loss and wall time.

  python experiments/distill/run.py --data=/path/to/tinyshakespeare.txt --root=runs/distill_repro

For each seed s: the teacher (configs/shakespeare_char.py, 4 layers x 128) trains for --steps;
the student (2 layers x 64, configs/distill.py's other settings) trains for --steps from scratch
(alpha = 0: cross-entropy alone, through the same binary) and distilled from teacher s
(alpha = --alpha, T = --temperature). Every model is then scored by gpt_jax.eval on the whole
validation split (the last 10% of the text). Writes results.json and prints the table.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

_DATA = flags.DEFINE_string('data', None, 'tinyshakespeare.txt.')
_ROOT = flags.DEFINE_string('root', 'runs/distill_repro', 'Workdirs of the runs.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Optimizer steps of every run.')
_ALPHA = flags.DEFINE_float('alpha', 0.5, 'Weight of the distillation term.')
_TEMPERATURE = flags.DEFINE_float('temperature', 2.0, 'Distillation temperature.')

COMMON = ['--config.train.log_every=50', '--config.train.eval_every=0',
          '--config.train.sample_tokens=0', '--config.train.progress_bar=false',
          '--config.train.measure_peak=false', '--config.checkpoint.every_steps=100000']
STUDENT = ['--config.model.num_layers=2', '--config.model.emb_dim=64',
           '--config.model.mlp_dim=256', '--config.model.num_heads=4',
           '--config.model.max_len=64', '--config.data.seq_len=64', '--config.data.batch_size=12',
           '--config.optim.lr=1e-3', '--config.optim.warmup_steps=100']


def timed(command: list[str]) -> float:
  print('$', shlex.join(command), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'{command[:4]} failed:\n{proc.stderr[-3000:]}')
  seconds = time.perf_counter() - start
  print(f'  {seconds:.0f} s (load {os.getloadavg()[1]:.1f})', flush=True)
  return seconds


def val_loss(workdir: str) -> float:
  """gpt_jax.eval's loss on the whole validation split."""
  proc = subprocess.run([sys.executable, '-m', 'gpt_jax.eval', f'--workdir={workdir}',
                         '--progress_bar=false'], cwd=REPO, capture_output=True, text=True,
                        check=True)
  path = proc.stdout.strip().rsplit('-> ', 1)[1]
  with open(path) as f:
    return json.load(f)['loss']


def main(argv):
  del argv
  data, steps = os.path.abspath(_DATA.value), _STEPS.value
  rows = {'teacher': [], 'student (scratch)': [], 'student (distilled)': []}
  for seed in _SEEDS.value:
    root = os.path.join(_ROOT.value, f'seed{seed}')
    teacher = os.path.join(root, 'teacher')
    seconds = timed([sys.executable, '-m', 'gpt_jax.train', '--config=configs/shakespeare_char.py',
                     f'--workdir={teacher}', f'--config.data.text_files={data}',
                     f'--config.seed={seed}', f'--config.train.num_steps={steps}',
                     f'--config.optim.decay_steps={steps}', *COMMON])
    rows['teacher'].append((val_loss(teacher), seconds))
    for name, alpha in (('student (scratch)', 0.0), ('student (distilled)', _ALPHA.value)):
      workdir = os.path.join(root, 'scratch' if alpha == 0 else 'distilled')
      seconds = timed([sys.executable, '-m', 'gpt_jax.distill', '--config=configs/distill.py',
                       f'--teacher={teacher}', f'--workdir={workdir}', f'--config.seed={seed}',
                       f'--config.train.num_steps={steps}', f'--config.distill.alpha={alpha}',
                       f'--config.distill.temperature={_TEMPERATURE.value}', *STUDENT, *COMMON])
      rows[name].append((val_loss(workdir), seconds))
    print(json.dumps(rows), flush=True)

  def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0

  results = {'steps': steps, 'seeds': _SEEDS.value, 'alpha': _ALPHA.value,
             'temperature': _TEMPERATURE.value, 'rows': rows}
  with open(os.path.join(HERE, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print('| model | val loss (mean ± sd) | per seed | wall s (mean) |\n|---|---|---|---|')
  for name, runs in rows.items():
    losses, seconds = [r[0] for r in runs], [r[1] for r in runs]
    print(f'| {name} | {statistics.mean(losses):.4f} ± {spread(losses):.4f} | '
          f'{", ".join(f"{x:.4f}" for x in losses)} | {statistics.mean(seconds):.0f} |')


if __name__ == '__main__':
  flags.mark_flag_as_required('data')
  app.run(main)
