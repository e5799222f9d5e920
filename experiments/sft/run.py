r"""Fine-tuning for chat, measured: held-out answers before and after SFT, LoRA against full.

  python experiments/sft/run.py [--out=runs/sft] [--sft_steps=600]

Runs, from the repository root (a step whose output exists is reused):
  data    python -m gpt_jax.datasets.support_faq --out_dir=OUT/data
  base    python -m gpt_jax.train --config=configs/default.py --workdir=OUT/base
  before  python -m gpt_jax.finetune --config=configs/sft.py --init_from=OUT/base \
              --workdir=OUT/before --config.lora.rank=0 --config.train.num_steps=1 \
              --config.optim.lr=0 (the model fine-tuning starts from: the base with the chat
              tokens' rows added, saved unchanged)
  lora    ... --workdir=OUT/lora --config.lora.rank=16 --config.train.num_steps=STEPS
  full    ... --workdir=OUT/full --config.lora.rank=0 --config.optim.lr=FULL_LR (all weights)
  eval    python -m gpt_jax.eval --workdir=OUT/<run> --chat_files=OUT/data/heldout.jsonl
and writes OUT/results.json and the Markdown table of experiments/sft/README.md.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str, log: str) -> float:
  """Runs `python -m args` from the repository root, output to `log`; returns its wall time."""
  print('$ python -m', ' '.join(args), flush=True)
  start = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.run([sys.executable, '-m', *args], cwd=REPO, stdout=f,
                          stderr=subprocess.STDOUT)
  if proc.returncode:
    sys.exit(f'error: {args[0]} failed (exit {proc.returncode}); see {log}')
  return time.perf_counter() - start


def trained_params(log: str) -> tuple[float, float]:
  """(all parameters, trained ones) in millions, from the training run's first line."""
  with open(log) as f:
    text = f.read()
  found = re.search(r'([\d.]+)M parameters(?: \(([\d.]+)M trained)?', text)
  if not found:
    sys.exit(f'error: no parameter count in {log}')
  total = float(found.group(1))
  return total, float(found.group(2) or total)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/sft', help='Folder for the data and the workdirs.')
  parser.add_argument('--sft_steps', type=int, default=600, help='Fine-tuning steps.')
  parser.add_argument('--lora_rank', type=int, default=16)
  parser.add_argument('--full_lr', type=float, default=1e-3,
                      help='Learning rate of full fine-tuning (LoRA keeps configs/sft.py\'s).')
  parser.add_argument('--max_new_tokens', type=int, default=64, help='Most tokens per answer.')
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  heldout = os.path.join(out, 'data', 'heldout.jsonl')
  train_files = os.path.join(out, 'data', 'train.jsonl')
  load = [os.getloadavg()[0]]

  if not os.path.exists(heldout):
    run('gpt_jax.datasets.support_faq', f'--out_dir={out}/data', log=f'{out}/data.log')
  base = os.path.join(out, 'base')
  if not os.path.exists(os.path.join(base, 'checkpoints', '1000')):
    run('gpt_jax.train', '--config=configs/default.py', f'--workdir={base}',
        '--config.train.progress_bar=False', log=f'{out}/base.log')

  sft = ['gpt_jax.finetune', '--config=configs/sft.py', f'--init_from={base}',
         f'--config.data.chat_files={train_files}', f'--config.data.val_chat_files={heldout}',
         '--config.train.progress_bar=False']
  runs = {
      'before': ['--config.lora.rank=0', '--config.train.num_steps=1', '--config.optim.lr=0',
                 '--config.train.eval_every=0', '--config.train.sample_tokens=0'],
      'lora': [f'--config.lora.rank={args.lora_rank}', f'--config.train.num_steps={args.sft_steps}'],
      'full': ['--config.lora.rank=0', f'--config.optim.lr={args.full_lr}',
               f'--config.train.num_steps={args.sft_steps}'],
  }
  results_path = os.path.join(out, 'results.json')
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)['runs']
  for name, flags in runs.items():
    workdir = os.path.join(out, name)
    row = results.get(name, {})
    if 'train_seconds' not in row:
      row['train_seconds'] = round(run(*sft, f'--workdir={workdir}', *flags,
                                       log=f'{out}/{name}.log'), 1)
      row['params_m'], row['trained_params_m'] = trained_params(f'{out}/{name}.log')
      row['flags'] = flags
    if 'rouge_l' not in row:
      row['eval_seconds'] = round(run('gpt_jax.eval', f'--workdir={workdir}',
                                      f'--chat_files={heldout}', '--progress_bar=False',
                                      f'--max_new_tokens={args.max_new_tokens}',
                                      log=f'{out}/{name}_eval.log'), 1)
      steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                     if s.isdigit())
      with open(os.path.join(workdir, 'eval', f'chat-heldout-step{steps[-1]}.json')) as f:
        row.update(json.load(f))
    results[name] = row
    with open(results_path, 'w') as f:
      json.dump({'date': datetime.date.today().isoformat(), 'runs': results}, f, indent=2)
  load.append(os.getloadavg()[0])

  print(f'\n{datetime.date.today()}, load average {load[0]:.1f} at start, {load[1]:.1f} at end\n')
  print('| model | trained params | SFT wall time | BLEU | ROUGE-L | exact match | '
        'assistant loss |')
  print('|---|---|---|---|---|---|---|')
  for name, row in results.items():
    seconds = '-' if name == 'before' else f"{row['train_seconds']:.0f} s"
    trained = '-' if name == 'before' else f"{row['trained_params_m']:.3f}M"
    print(f"| {name} | {trained} | {seconds} | {row['bleu']:.2f} | {row['rouge_l']:.2f} | "
          f"{row['exact_match']:.1%} | {row['assistant_loss']:.3f} |")


if __name__ == '__main__':
  main()
