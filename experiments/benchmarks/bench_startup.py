"""Start-up: seconds from launching `python -m gpt_jax.train` until its first training step is
done, for a cold start and for a restart that finds the persistent compilation cache.

  python experiments/benchmarks/bench_startup.py --data=../shared/data/tinyshakespeare.txt \
      [--config=configs/shakespeare_char.py] [--repeats=3] [--json=FILE]

Every run is the same command (6 steps, a checkpoint every 3), as after a preemption. Per
repeat, in a fresh workdir (TFDS data dir inside it):
  cold     the first run: builds the dataset and the tokenizer, compiles (and fills
           <workdir>/jax_cache), trains 6 steps, checkpoints steps 3 and 6;
  restart  checkpoint 6 removed, the same command again: restores step 3, traces the steps and
           loads their programs from the compilation cache, trains steps 4-6;
  restart, no cache  as restart, with train.compilation_cache=False (what both save);
  restart, TensorBoard  as restart, with train.tensorboard=True (the default of most configs;
           every other run here writes metrics.jsonl only), after one untimed such run: what
           writing TensorBoard events costs at start-up (tensorboardX imports torch where torch
           is installed).
"First step done" is when the process appends its first training row to metrics.jsonl (logged
every step here), polled every 5 ms from this process; the whole process time is reported too.
Also prints the compile time of the train step from the cold run's log (JAX_LOG_COMPILES).
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def train_rows(metrics):
  if not os.path.exists(metrics):
    return []
  with open(metrics) as f:
    lines = [line for line in f if line.endswith('\n')]  # whole lines only
  return [row for row in map(json.loads, lines) if 'train_loss' in row]


def first_step_seconds(workdir, args, resume_step=0, extra=()):
  """(seconds until a training row past `resume_step` is in metrics.jsonl, whole process
  seconds, stderr)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):  # drop the rows a previous run logged after resume_step
    kept = [row for row in train_rows(metrics) if row['step'] <= resume_step]
    with open(metrics, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in kept)
  cmd = [sys.executable, '-m', 'gpt_jax.train', f'--config={args.config}',
         f'--workdir={workdir}', f'--config.data.text_files={os.path.abspath(args.data)}',
         f'--config.data.tfds_data_dir={os.path.join(workdir, "tfds")}',
         '--config.train.num_steps=6', '--config.checkpoint.every_steps=3',
         '--config.train.log_every=1', '--config.train.eval_every=0',
         '--config.train.sample_tokens=0', '--config.train.measure_peak=False',
         '--config.train.progress_bar=False', '--config.train.tensorboard=False', *extra]
  # (a later --config flag overrides an earlier one: `extra` can turn TensorBoard back on)
  env = dict(os.environ, JAX_LOG_COMPILES='1')
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = None
  while proc.poll() is None and first is None:
    if any(row['step'] > resume_step for row in train_rows(metrics)):
      first = time.perf_counter() - start
      break
    time.sleep(0.005)
  stderr = proc.communicate()[1]
  total = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'failed: {" ".join(cmd)}\n{stderr[-3000:]}')
  return first if first is not None else total, total, stderr


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True, help='tinyshakespeare.txt')
  p.add_argument('--config', default='configs/shakespeare_char.py')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--json', default='')
  args = p.parse_args()
  torch_installed = importlib.util.find_spec('torch') is not None
  results = {'config': args.config, 'load_before': os.getloadavg()[0], 'repeats': []}
  for _ in range(args.repeats):
    workdir = tempfile.mkdtemp(prefix='bench_startup_')
    try:
      cold, cold_total, log = first_step_seconds(workdir, args)
      compiles = [float(s) for s in re.findall(
          r'Finished XLA compilation of jit\(train_step\) in ([0-9.]+) sec', log)]
      drop_last_checkpoint = lambda: shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
      drop_last_checkpoint()
      restart, restart_total, log = first_step_seconds(workdir, args, resume_step=3)
      cache_hits = len(re.findall(r'Persistent compilation cache hit', log))
      drop_last_checkpoint()
      no_cache, no_cache_total, _ = first_step_seconds(
          workdir, args, resume_step=3, extra=['--config.train.compilation_cache=False'])
      # A changed config compiles its steps anew (compiled_steps' key covers the whole config):
      # one untimed run saves them, as the earlier runs did for the config without TensorBoard.
      for _ in range(2):
        drop_last_checkpoint()
        tensorboard, tensorboard_total, _ = first_step_seconds(
            workdir, args, resume_step=3, extra=['--config.train.tensorboard=True'])
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    row = {'cold_first_step_s': cold, 'cold_process_s': cold_total,
           'train_step_compile_s': compiles[0] if compiles else None,
           'restart_first_step_s': restart, 'restart_process_s': restart_total,
           'restart_no_cache_first_step_s': no_cache, 'restart_no_cache_process_s': no_cache_total,
           'restart_tensorboard_first_step_s': tensorboard,
           'restart_tensorboard_process_s': tensorboard_total,
           'restart_cache_hits': cache_hits, 'torch_installed': torch_installed}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
          flush=True)
    results['repeats'].append(row)
  results['load_after'] = os.getloadavg()[0]
  median = lambda key: statistics.median(r[key] for r in results['repeats'])
  print(f"median of {args.repeats}: cold start to first step {median('cold_first_step_s'):.2f} s "
        f"(train step compile {median('train_step_compile_s'):.2f} s); restart with the "
        f"compilation cache {median('restart_first_step_s'):.2f} s, without "
        f"{median('restart_no_cache_first_step_s'):.2f} s: the cache makes restarts "
        f"{median('restart_no_cache_first_step_s') / median('restart_first_step_s'):.2f}x "
        f"faster to their first step; with TensorBoard events "
        f"{median('restart_tensorboard_first_step_s'):.2f} s "
        f"({median('restart_tensorboard_first_step_s') / median('restart_first_step_s'):.2f}x "
        f"the restart without them; torch {'' if torch_installed else 'not '}installed)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
