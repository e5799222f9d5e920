r"""nanoGPT's shakespeare-char "baby GPT": gpt_jax and the PyTorch reference, back to back.

  python experiments/shakespeare_char/run.py --data=../shared/data/tinyshakespeare.txt \
      --torch_gpt=../shared/peers/torch_gpt.py --root=runs/shakespeare_char_repro

Runs, one after another on the same machine:
  1. gpt_jax, `configs/shakespeare_char.py` as it is (nanoGPT's settings, no biases);
  2. the PyTorch reference (`torch_gpt.py`) with the same settings (it always has biases);
  3. gpt_jax with `--config.model.use_bias=True`, the reference's exact architecture.
Then it measures the final train loss of both gpt_jax runs the way the reference does (mean
loss over 200 batches of 12 x 64 from the train split, with the final parameters), writes
`results.json`, draws `loss_curves.png` and puts the result table into README.md between the
`results:start` / `results:end` markers.
"""

import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

_DATA = flags.DEFINE_string('data', None, 'tinyshakespeare.txt.')
_TORCH_GPT = flags.DEFINE_string('torch_gpt', None, 'The PyTorch reference, torch_gpt.py.')
_ROOT = flags.DEFINE_string('root', 'runs/shakespeare_char_repro', 'Workdirs of the runs.')
_OUT = flags.DEFINE_string('out', HERE, 'Where results.json, the PNG and README.md are.')
_SKIP_TORCH = flags.DEFINE_bool('skip_torch', False, 'Run gpt_jax only.')
_RENDER_ONLY = flags.DEFINE_bool('render_only', False,
                                 'Redraw the PNG and README table from results.json; run nothing.')

EVAL_BATCHES = 200  # batches of 12 x 64 for every loss the table reports
STEPS = 2000
# nanoGPT's baby-GPT settings, as torch_gpt.py flags.
TORCH_ARGS = ['--n_layer', '4', '--n_head', '4', '--n_embd', '128', '--block_size', '64',
              '--batch_size', '12', '--steps', str(STEPS), '--lr', '1e-3', '--min_lr', '1e-4',
              '--warmup', '100', '--weight_decay', '0.1', '--beta2', '0.99',
              '--eval_every', '250', '--eval_batches', str(EVAL_BATCHES)]


def _timed(command: list[str], log_path: str) -> tuple[float, str, float]:
  """(wall seconds, stdout, machine load) of a command; its output is kept in `log_path`.

  The load is the 5-minute load average when the command ends: how many processes wanted the
  2 cores meanwhile (other work included), which the wall time depends on.
  """
  print('$', shlex.join(command), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  load = os.getloadavg()[1]
  with open(log_path, 'w') as f:
    f.write(proc.stdout + proc.stderr)
  if proc.returncode:
    raise RuntimeError(f'{command[:4]} failed ({proc.returncode}); see {log_path}:\n'
                       + proc.stderr[-3000:])
  print(f'  {seconds:.0f} s, load {load:.1f}', flush=True)
  return seconds, proc.stdout, load


def _gpt_jax_args(workdir: str, data: str, *overrides: str) -> list[str]:
  return ['-m', 'gpt_jax.train', '--config=configs/shakespeare_char.py', f'--workdir={workdir}',
          f'--config.data.text_files={data}', '--config.train.log_every=10', *overrides]


def _prepare_dataset(data: str) -> None:
  """Builds the TFDS copy of the corpus once, so that no run's wall time includes it."""
  sys.path.insert(0, REPO)
  from configs import shakespeare_char  # pylint: disable=g-import-not-at-top
  from gpt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = shakespeare_char.get_config()
  config.data.text_files = data
  next(data_lib.open_texts(config.data, config.data.train_split))


def _split_loss(workdir: str, split: str) -> tuple[float, int]:
  """(mean loss of the final parameters over the first EVAL_BATCHES batches of `split`,
  the number of parameters)."""
  code = f"""
import json, jax, optax
from gpt_jax import checkpoint, data, tokenizer
from gpt_jax.model import Transformer
workdir = {workdir!r}
config = checkpoint.load_config(workdir)
config.data.val_split = {split!r}
model_cfg, params, _ = checkpoint.load_model(workdir)
tok = tokenizer.load(workdir + '/tokenizer')
batches = data.make_eval_batches(config, tok, workdir, {EVAL_BATCHES})
model = Transformer(model_cfg)
@jax.jit
def loss(params, inputs, targets):
  logits, _ = model.apply({{'params': params}}, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
mean = sum(float(loss(params, b['inputs'], b['targets'])) for b in batches) / len(batches)
print(json.dumps([mean, sum(x.size for x in jax.tree.leaves(params))]))
"""
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  mean, num_params = json.loads(proc.stdout.strip().splitlines()[-1])
  return mean, num_params


def run_gpt_jax(name: str, root: str, data: str, *overrides: str) -> dict:
  workdir = os.path.join(root, name)
  if os.path.exists(os.path.join(workdir, 'config.json')):
    shutil.rmtree(workdir)  # a fresh run, so that the wall time is a whole run's
  args = _gpt_jax_args(workdir, data, *overrides)
  seconds, _, load = _timed([sys.executable, *args], os.path.join(root, f'{name}.log'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    events = [json.loads(line) for line in f]
  train = [(e['step'], e['train_loss']) for e in events if 'train_loss' in e]
  val = [(e['step'], e['val_loss']) for e in events if 'val_loss' in e]
  # The first interval includes compilation.
  speeds = [e['tokens_per_s'] for e in events if 'tokens_per_s' in e][1:]
  train_loss, num_params = _split_loss(workdir, 'train')
  return {
      'name': name, 'command': shlex.join(['python', *args]), 'wall_s': seconds, 'load': load,
      'tokens_per_s': statistics.median(speeds), 'final_val_loss': val[-1][1],
      'final_train_loss': train_loss, 'params': num_params,
      'train_curve': train, 'val_curve': val,
      'val_measured_on': f'the first {EVAL_BATCHES} batches of 12 x 64 of the val split in order '
                         '(the split holds 143: all of it, each character once)',
  }


def run_torch(root: str, data: str, torch_gpt: str) -> dict:
  command = [sys.executable, torch_gpt, '--data', data, *TORCH_ARGS]
  seconds, stdout, load = _timed(command, os.path.join(root, 'torch_gpt.log'))
  lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]
  evals = [e for e in lines if 'val_loss' in e]
  summary = next(e for e in lines if e.get('summary'))
  return {
      'name': 'torch_gpt', 'command': shlex.join(['python', *command[1:]]), 'wall_s': seconds,
      'load': load,
      'tokens_per_s': summary['tokens_per_s'], 'final_val_loss': evals[-1]['val_loss'],
      'final_train_loss': evals[-1]['train_loss'], 'params': summary['params'],
      'train_curve': [(e['step'], e['train_loss']) for e in evals],
      'val_curve': [(e['step'], e['val_loss']) for e in evals],
      'val_measured_on': f'{EVAL_BATCHES} batches of 12 x 64 at random offsets of the val split',
  }


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, r in enumerate(results):
    color = f'C{i}'
    steps, losses = zip(*r['train_curve'])
    dense = len(steps) > 20
    ax.plot(steps, losses, color=color, alpha=0.35 if dense else 1, lw=1,
            ls='-' if dense else '--', label=f"{r['label']} train"
            + (' (one batch every 10 steps)' if dense else f' ({EVAL_BATCHES} batches)'))
    steps, losses = zip(*r['val_curve'])
    ax.plot(steps, losses, color=color, marker='o', ms=3, lw=1.5, label=f"{r['label']} val")
  ax.set_xlabel('step (12 x 64 tokens)')
  ax.set_ylabel('loss (nats / character)')
  ax.set_ylim(1.3, 3.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title('shakespeare-char baby GPT, 2000 steps on 2 CPU cores')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(results: list[dict], date: str) -> str:
  lines = ['| run | params | final train loss | final val loss | wall time | tokens/s | load | '
           'command |', '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f"| {r['label']} | {r['params']:,} | {r['final_train_loss']:.4f} | "
                 f"{r['final_val_loss']:.4f} | {r['wall_s']:.0f} s | {r['tokens_per_s']:,.0f} | "
                 f"{r.get('load', float('nan')):.1f} | `{r['command']}` |")
  return '\n'.join(lines) + (f'\n\nMeasured {date}, one run after another on the same '
                             f'{os.cpu_count()} CPU cores, shared with other work.')


def write_readme(markdown: str) -> None:
  path = os.path.join(_OUT.value, 'README.md')
  with open(path) as f:
    text = f.read()
  new = re.sub(r'(<!-- results:start -->\n).*?(<!-- results:end -->)',
               lambda m: m[1] + markdown + '\n' + m[2], text, flags=re.S)
  with open(path, 'w') as f:
    f.write(new)


def render(results: list[dict], date: str) -> None:
  plot(results, os.path.join(_OUT.value, 'loss_curves.png'))
  markdown = table(results, date)
  write_readme(markdown)
  print(markdown)


def main(argv):
  del argv
  if _RENDER_ONLY.value:
    with open(os.path.join(_OUT.value, 'results.json')) as f:
      saved = json.load(f)
    render(saved['runs'], saved['date'])
    return
  if not _DATA.value or (not _TORCH_GPT.value and not _SKIP_TORCH.value):
    raise app.UsageError('--data and --torch_gpt (or --skip_torch) are required')
  root = os.path.abspath(_ROOT.value)
  data = os.path.abspath(_DATA.value)
  os.makedirs(root, exist_ok=True)
  date = datetime.date.today().isoformat()
  _prepare_dataset(data)

  results = [run_gpt_jax('gpt_jax', root, data)]
  results[-1]['label'] = 'gpt_jax (nanoGPT config: no biases)'
  if not _SKIP_TORCH.value:
    results.append(run_torch(root, data, os.path.abspath(_TORCH_GPT.value)))
    results[-1]['label'] = 'torch_gpt.py (reference: biases)'
  results.append(run_gpt_jax('gpt_jax_bias', root, data, '--config.model.use_bias=True'))
  results[-1]['label'] = 'gpt_jax, use_bias=True (reference architecture)'
  for r in results:
    r['command'] = r['command'].replace(data, 'tinyshakespeare.txt')
    r['command'] = r['command'].replace(root, _ROOT.value.rstrip('/'))
    if _TORCH_GPT.value:
      r['command'] = r['command'].replace(os.path.abspath(_TORCH_GPT.value), 'torch_gpt.py')

  with open(os.path.join(_OUT.value, 'results.json'), 'w') as f:
    json.dump({'date': date, 'cpu_count': os.cpu_count(), 'runs': results}, f, indent=1)
  render(results, date)


if __name__ == '__main__':
  app.run(main)
