r"""Kill one process of a 2-process run: the survivor stops, naming it; a relaunch resumes exactly.

  python experiments/kill_resume/multihost.py [--heartbeat_timeout=10] [--kill=1]

Two processes of 4 (simulated CPU) devices each on 127.0.0.1 (jax.distributed), mesh data x
fsdp x tensor = 2 x 2 x 2, train the tiny config below (dropout on, checkpoints every 10 steps):
once uninterrupted; once with `kill -9` of process --kill after step 25 is logged. Reported: how
long the survivor took to stop after the kill, its exit status and last line; then both
processes are relaunched with the same command and the run's per-step losses and final
parameters are compared with the uninterrupted run's, bit for bit.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare.txt')
OVERRIDES = {
    'model.num_layers': 2, 'model.num_heads': 4, 'model.emb_dim': 64, 'model.mlp_dim': 256,
    'model.max_len': 64, 'model.dropout': 0.1, 'model.vocab_size': 264, 'data.tokenizer': 'byte',
    'data.tfds_name': '', 'data.seq_len': 64, 'data.batch_size': 8, 'train.num_steps': 50,
    'train.log_every': 1, 'train.eval_every': 0, 'checkpoint.every_steps': 10,
    'optim.warmup_steps': 5, 'train.progress_bar': False, 'train.sample_tokens': 0,
    'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2,
}


def _port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, text, heartbeat_timeout):
  """Both processes of the run, with the same command but --process_id."""
  port = _port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu'}
  flags = {**OVERRIDES, 'data.text_files': text}
  command = [sys.executable, '-m', 'gpt_jax.train', '--config=configs/default.py',
             f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2', f'--heartbeat_timeout={heartbeat_timeout}'] + [
                 f'--config.{k}={v}' for k, v in flags.items()]
  return [subprocess.Popen(command + [f'--process_id={i}'], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(procs):
  for proc in procs:
    _, err = proc.communicate(timeout=900)
    if proc.returncode:
      raise RuntimeError(err[-3000:])


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['train_loss'] for r in map(json.loads, f) if 'train_loss' in r}


def params(workdir):
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel  (not needed by the parent until now)
  from gpt_jax import checkpoint  # pylint: disable=import-outside-toplevel
  return [np.asarray(p) for p in jax.tree.leaves(checkpoint.load_model(workdir)[1])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--heartbeat_timeout', type=int, default=10)
  parser.add_argument('--kill', type=int, default=1, choices=(0, 1))
  parser.add_argument('--text', default=TEXT)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix='multihost_')
  straight, killed = os.path.join(root, 'straight'), os.path.join(root, 'killed')

  start_time = time.perf_counter()
  finish(start(straight, args.text, args.heartbeat_timeout))
  print(f'uninterrupted run: {time.perf_counter() - start_time:.1f} s, '
        f'{max(losses(straight))} steps', flush=True)

  procs = start(killed, args.text, args.heartbeat_timeout)
  while not (os.path.exists(os.path.join(killed, 'metrics.jsonl')) and
             max(losses(killed), default=0) >= 25):
    if any(p.poll() is not None for p in procs):
      raise RuntimeError('a process ended before the kill: ' + procs[0].communicate()[1][-3000:])
    time.sleep(0.05)
  step = max(losses(killed))
  procs[args.kill].kill()
  killed_at = time.perf_counter()
  survivor = procs[1 - args.kill]
  _, err = survivor.communicate(timeout=600)
  stopped = time.perf_counter() - killed_at
  with open(os.path.join(root, 'survivor.stderr'), 'w', encoding='utf-8') as f:
    f.write(err)
  lines = [line for line in err.replace('\r', '\n').splitlines()
           if line.startswith(('error:', 'F1', 'E1', 'terminate', '  what()'))]
  print(f'kill -9 of process {args.kill} at step {step}: process {1 - args.kill} stopped '
        f'{stopped:.1f} s later, exit status {survivor.returncode}; its errors '
        f'({root}/survivor.stderr):\n  ' + '\n  '.join(lines), flush=True)
  procs[args.kill].wait()

  checkpoints = sorted(int(d) for d in os.listdir(os.path.join(killed, 'checkpoints'))
                       if d.isdigit())
  start_time = time.perf_counter()
  finish(start(killed, args.text, args.heartbeat_timeout))
  print(f'relaunched (latest checkpoint then: step {checkpoints[-1]}): finished in '
        f'{time.perf_counter() - start_time:.1f} s', flush=True)
  same_losses = losses(killed) == losses(straight)
  same_params = all(np.array_equal(a, b) for a, b in zip(params(killed), params(straight),
                                                         strict=True))
  print(f'per-step losses identical: {same_losses}; final parameters identical: {same_params}')
  sys.exit(0 if same_losses and same_params else 1)


if __name__ == '__main__':
  main()
