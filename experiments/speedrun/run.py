"""CPU speedrun: time `python -m gpt_jax.train --config=configs/speedrun_shakespeare.py` from a
cold start to validation loss <= 1.886 on the whole split, back to back with the PyTorch baseline.

  python experiments/speedrun/run.py --data=../shared/data/tinyshakespeare.txt \
      --torch_gpt=../shared/peers/torch_gpt.py [--repeats=2] [--json=experiments/speedrun/results.json]

Each repeat runs, one after another on the same machine:
  1. the baseline: torch_gpt.py with nanoGPT's baby settings (4 x 128, context 64, batch 12,
     2000 steps, lr 1e-3 -> 1e-4), its whole process timed, once per --torch_threads entry
     (torch at 2 threads slows down badly when other processes share the cores; the ratio is
     taken against the fastest baseline run);
  2. gpt_jax: the config's whole training process, from an empty workdir and an empty TFDS data
     dir (building the dataset, the tokenizer, compiling, training, the final evaluation over
     all of the validation split and the last checkpoint all count);
  3. `python -m gpt_jax.eval` on that workdir: every validation token but the first predicted
     once (a check of 2's loss; its own time is reported beside it);
  4. with --without_torch, 2 again with torch made unimportable (as in a default install,
     where torch is only a test dependency: tensorboardX imports it whenever it is installed);
  5. with --startup, the same training process stopped after one step: the fixed costs;
  6. with --versus=OVERRIDES, 2 again with those config overrides (before 2 in the first, third,
     ... repeat, after 3 in the others): what a change to the config bought, in one invocation.
Prints one row per run and the ratio fastest baseline time / gpt_jax time.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TARGET = 1.886
BASELINE_ARGS = ['--n_layer', '4', '--n_head', '4', '--n_embd', '128', '--block_size', '64',
                 '--batch_size', '12', '--steps', '2000', '--lr', '1e-3', '--min_lr', '1e-4',
                 '--warmup', '100', '--weight_decay', '0.1', '--beta2', '0.99',
                 '--eval_every', '2000', '--eval_batches', '20']


def timed(cmd, **kwargs):
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)
  seconds = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f'failed ({proc.returncode}): {" ".join(cmd)}\n{proc.stdout[-3000:]}'
             f'{proc.stderr[-3000:]}')
  return seconds, proc.stdout


def baseline(args, threads: int):
  extra = ['--threads', str(threads)] if threads else []
  cmd = [sys.executable, args.torch_gpt, '--data', args.data] + BASELINE_ARGS + extra
  seconds, out = timed(cmd)
  lines = [json.loads(l) for l in out.splitlines() if l.startswith('{')]
  val = [l['val_loss'] for l in lines if 'val_loss' in l][-1]
  return {'run': f'torch_gpt.py (baseline, {lines[-1]["threads"]} threads)', 'wall_s': seconds,
          'val_loss': val, 'val_measured_on': '20 random batches (its own estimate)',
          'command': 'python torch_gpt.py --data DATA ' + ' '.join(BASELINE_ARGS + extra)}


# torch is a test-only dependency of gpt_jax, but tensorboardX (imported by gpt_jax.metrics when
# train.tensorboard is on) imports it whenever it is installed, which costs seconds of start-up;
# this runs gpt_jax.train as a default install (no torch) would.
WITHOUT_TORCH = ("import sys, runpy; sys.modules['torch'] = None; "
                 "runpy.run_module('gpt_jax.train', run_name='__main__', alter_sys=True)")


def ours(args, extra=(), without_torch=False):
  workdir = os.path.abspath(args.workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  overrides = [f'--config.data.text_files={os.path.abspath(args.data)}',
               f'--config.data.tfds_data_dir={os.path.join(workdir, "tfds")}', *extra]
  entry = ['-c', WITHOUT_TORCH] if without_torch else ['-m', 'gpt_jax.train']
  cmd = [sys.executable, *entry, f'--config={args.config}', f'--workdir={workdir}', *overrides]
  seconds, _ = timed(cmd)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  val = [r['val_loss'] for r in rows if 'val_loss' in r]
  shown = ' '.join(['python -m gpt_jax.train', f'--config={args.config}', '--workdir=WORKDIR',
                    '--config.data.text_files=DATA', '--config.data.tfds_data_dir=WORKDIR/tfds',
                    *extra])
  return {'run': 'gpt_jax' + (' (torch not importable)' if without_torch else ''),
          'wall_s': seconds, 'val_loss': val[-1] if val else None,
          'train_loss': [r['train_loss'] for r in rows if 'train_loss' in r][-1],
          'val_measured_on': 'whole validation split (every 65-token window)',
          'command': shown}


def full_eval(args):
  workdir = os.path.abspath(args.workdir)
  seconds, out = timed([sys.executable, '-m', 'gpt_jax.eval', f'--workdir={workdir}',
                        '--progress_bar=false'])
  path = sorted(os.listdir(os.path.join(workdir, 'eval')))[-1]
  result = json.load(open(os.path.join(workdir, 'eval', path)))
  return {'run': 'python -m gpt_jax.eval (check)', 'wall_s': seconds, 'val_loss': result['loss'],
          'val_measured_on': f'whole validation split, every token ({result["tokens"]:,})',
          'command': 'python -m gpt_jax.eval --workdir=WORKDIR'}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True, help='tinyshakespeare.txt')
  p.add_argument('--torch_gpt', required=True, help='the PyTorch reference torch_gpt.py')
  p.add_argument('--config', default='configs/speedrun_shakespeare.py')
  p.add_argument('--workdir', default='runs/speedrun')
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--startup', action='store_true', help='also time a one-step run')
  p.add_argument('--torch_threads', default='0,1',
                 help='baseline runs, one per torch thread count (0: torch default, here 2); '
                      'the ratio is taken against the fastest')
  p.add_argument('--without_torch', action='store_true',
                 help='also run gpt_jax with torch made unimportable, as in a default install')
  p.add_argument('--skip_baseline', action='store_true')
  p.add_argument('--versus', default='',
                 help="config overrides, e.g. an earlier record's settings: each repeat also "
                      'times gpt_jax with them, before gpt_jax in the first, third, ... repeat and '
                      'after it in the others, and prints the ratio of the two wall times')
  p.add_argument('--json', default='')
  args = p.parse_args()
  args.data, args.torch_gpt = os.path.abspath(args.data), os.path.abspath(args.torch_gpt)
  results = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes'),
             'config': args.config, 'target': TARGET, 'repeats': []}
  for repeat in range(args.repeats):
    rows = [] if args.skip_baseline else [
        baseline(args, int(t)) for t in args.torch_threads.split(',')]
    n_base = len(rows)
    versus = []
    if args.versus and repeat % 2 == 0:
      versus = [ours(args, shlex.split(args.versus))]
    rows += [ours(args), full_eval(args)]
    if args.versus and repeat % 2 == 1:
      versus = [ours(args, shlex.split(args.versus))]
    for row in versus:
      row['run'] = f'gpt_jax {args.versus}'
    rows += versus
    if args.without_torch:
      rows.append(ours(args, without_torch=True))
    if args.startup:
      startup = ours(args, ['--config.train.num_steps=1', '--config.train.eval_every=0'])
      startup.update(run='gpt_jax, one step (start-up and compile)', val_loss=None,
                     val_measured_on='-')
      rows.append(startup)
    rows[-1]['load_after'] = os.getloadavg()[0]
    for row in rows:
      print(f"{row['run']:45s} {row['wall_s']:7.1f} s  val {row['val_loss'] or float('nan'):.4f}"
            f"  ({row['val_measured_on']})", flush=True)
    best = min([r['wall_s'] for r in rows[:n_base]] or [float('nan')])
    for ours_row in rows[n_base:]:
      if ours_row['run'].startswith('gpt_jax') and ours_row['val_loss'] is not None:
        print(f'fastest baseline / {ours_row["run"]}: {best / ours_row["wall_s"]:.2f}x; '
              f'val {ours_row["val_loss"]:.4f} '
              f'{"<=" if ours_row["val_loss"] <= TARGET else ">"} {TARGET}', flush=True)
    if versus:
      print(f'gpt_jax {args.versus} / gpt_jax: {versus[0]["wall_s"] / rows[n_base]["wall_s"]:.2f}x '
            'the wall time', flush=True)
    results['repeats'].append({'rows': rows, 'load_after': os.getloadavg()[0]})
  if args.json:  # appended to the invocations already recorded there
    recorded = {'invocations': []}
    if os.path.exists(args.json):
      with open(args.json) as f:
        recorded = json.load(f)
    recorded['invocations'].append(results)
    with open(args.json + '.tmp', 'w') as f:
      json.dump(recorded, f, indent=1)
    os.replace(args.json + '.tmp', args.json)


if __name__ == '__main__':
  main()
