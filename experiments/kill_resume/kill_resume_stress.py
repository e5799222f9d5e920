r"""Kill a training run with SIGKILL at random moments, resume it, and compare with a clean run.

  python experiments/kill_resume/kill_resume_stress.py --kills=20

Each trial starts a fresh run of the tiny config below, kills it with SIGKILL after a random
delay (anywhere from start-up and compilation to mid-step or mid-checkpoint-write), then runs the
same command again until it finishes. The trial is identical when every logged per-step loss and
every final parameter equals the uninterrupted run's bit for bit. Prints "N/N identical".
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {
    'model.num_layers': 2, 'model.num_heads': 4, 'model.emb_dim': 64, 'model.mlp_dim': 256,
    'model.max_len': 64, 'model.dropout': 0.1, 'data.seq_len': 64, 'data.batch_size': 8,
    'data.vocab_size': 512, 'train.num_steps': 40, 'train.log_every': 1, 'train.eval_every': 0,
    'checkpoint.every_steps': 5, 'optim.warmup_steps': 5, 'train.measure_peak': False,
    'train.progress_bar': False, 'train.sample_tokens': 0,
}


def train_command(workdir, tfds_dir, cache_dir):
  flags = {**OVERRIDES, 'data.tfds_data_dir': tfds_dir, 'data.cache_dir': cache_dir}
  return [sys.executable, '-m', 'gpt_jax.train', '--config=configs/default.py',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in flags.items()]


def run(command, kill_after=None) -> bool:
  """Runs command; kills it with SIGKILL after kill_after seconds. True if it finished."""
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    proc.wait(timeout=kill_after)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return False
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr.read().decode()[-3000:])
  return True


def fingerprint(workdir):
  """Per-step losses and final parameters of a finished run."""
  sys.path.insert(0, REPO)
  from gpt_jax import checkpoint  # imported late: jax start-up is not needed by the parent
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = {r['step']: r['train_loss'] for r in map(json.loads, f) if 'train_loss' in r}
  params = checkpoint.load_model(workdir)[1]
  import jax
  return losses, [np.asarray(p) for p in jax.tree.leaves(params)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix='kill_resume_')
  tfds_dir, cache_dir = os.path.join(root, 'tfds'), os.path.join(root, 'cache')

  reference_dir = os.path.join(root, 'uninterrupted')
  run(train_command(reference_dir, tfds_dir, cache_dir))  # also warms the dataset caches
  start = time.time()
  run(train_command(os.path.join(root, 'timed'), tfds_dir, cache_dir))
  duration = time.time() - start
  reference = fingerprint(reference_dir)
  print(f'uninterrupted run: {duration:.1f} s, {len(reference[0])} steps')

  identical = []
  for trial in range(args.kills):
    finished, attempt = True, 0
    while finished:  # a run that ends before its kill time was not killed: draw again
      workdir = os.path.join(root, f'trial_{trial}_{attempt}')
      delay = rng.uniform(0.5, duration)
      finished = run(train_command(workdir, tfds_dir, cache_dir), kill_after=delay)
      attempt += 1
    restarts = 0
    while not finished:
      finished = run(train_command(workdir, tfds_dir, cache_dir))
      restarts += 1
    losses, params = fingerprint(workdir)
    same = losses == reference[0] and all(
        np.array_equal(a, b) for a, b in zip(params, reference[1], strict=True))
    identical.append(same)
    print(f'trial {trial:2d}: SIGKILL after {delay:5.2f} s, {restarts} restart(s): '
          f'{"identical" if same else "DIFFERENT"}', flush=True)
  print(f'{sum(identical)}/{len(identical)} identical')
  differing = [i for i, same in enumerate(identical) if not same]
  if differing:
    print(f'differing trials: {differing}')
  sys.exit(1 if differing else 0)


if __name__ == '__main__':
  main()
