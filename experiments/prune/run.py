r"""Structured pruning on character-level tiny Shakespeare: validation loss before pruning, after,
and after a short recovery fine-tune, at two pruning levels, by both criteria.

  python experiments/prune/run.py --data=/path/to/tinyshakespeare.txt \
      --models=runs/distill_repro/seed0/teacher,runs/distill_repro/seed1/teacher,...

Each model (a trained workdir, e.g. the teachers of experiments/distill/run.py: 4 layers x 4
heads, MLP 512) is pruned by gpt_jax.prune to each level, scored by gpt_jax.eval on the whole
validation split, fine-tuned for --steps with configs/finetune.py:PRUNED, and scored again.
Writes results.json and prints the table. `--levels=none --criteria=magnitude
--results=control.json` is the control: the same fine-tuning of the unpruned models.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

_DATA = flags.DEFINE_string('data', None, 'tinyshakespeare.txt.')
_MODELS = flags.DEFINE_list('models', None, 'Trained workdirs to prune.')
_ROOT = flags.DEFINE_string('root', 'runs/prune_repro', 'Workdirs of the pruned models.')
_STEPS = flags.DEFINE_integer('steps', 200, 'Recovery fine-tuning steps.')
_LR = flags.DEFINE_float('lr', 5e-4, 'Recovery fine-tuning peak learning rate.')
# (heads per layer, MLP units) of 4 and 512; 'none' keeps everything: the control, the same
# fine-tuning of the unpruned model.
LEVELS = {'none': (4, 512), 'half': (2, 256), 'quarter': (1, 128)}
_LEVELS = flags.DEFINE_list('levels', ['half', 'quarter'], f'Of {list(LEVELS)}.')
_CRITERIA = flags.DEFINE_list('criteria', ['magnitude', 'activation'], 'Importance criteria.')
_RESULTS = flags.DEFINE_string('results', 'results.json', 'File (in this folder) to write.')


def run(*args: str) -> tuple[str, float]:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'{args[:3]} failed:\n{proc.stderr[-3000:]}')
  return proc.stdout, time.perf_counter() - start


def val_loss(workdir: str) -> float:
  out, _ = run('-m', 'gpt_jax.eval', f'--workdir={workdir}', '--progress_bar=false')
  with open(out.strip().rsplit('-> ', 1)[1]) as f:
    return json.load(f)['loss']


def main(argv):
  del argv
  data = os.path.abspath(_DATA.value)
  results = []
  for index, model in enumerate(_MODELS.value):
    before = val_loss(model)
    for level in _LEVELS.value:
      heads, mlp = LEVELS[level]
      for criterion in _CRITERIA.value:
        pruned = os.path.join(_ROOT.value, f'model{index}', f'{level}_{criterion}')
        out, _ = run('-m', 'gpt_jax.prune', f'--workdir={model}', f'--out={pruned}',
                     f'--heads_per_layer={heads}', f'--mlp_dim={mlp}', f'--criterion={criterion}')
        params = out.strip().rsplit(', ', 1)[1].split(' parameters')[0]  # '0.80M -> 0.50M'
        after = val_loss(pruned)
        tuned = pruned + '_ft'
        _, seconds = run('-m', 'gpt_jax.train', f'--config=configs/finetune.py:{pruned}',
                         f'--workdir={tuned}', f'--config.data.text_files={data}',
                         f'--config.train.num_steps={_STEPS.value}',
                         f'--config.optim.lr={_LR.value}', '--config.optim.warmup_steps=20',
                         '--config.train.eval_every=0', '--config.train.sample_tokens=0',
                         '--config.train.progress_bar=false', '--config.train.measure_peak=false',
                         f'--config.checkpoint.every_steps={_STEPS.value}')
        row = {'model': model, 'level': level, 'criterion': criterion, 'heads': heads,
               'mlp_dim': mlp, 'params': params, 'before': before, 'after': after,
               'after_finetune': val_loss(tuned), 'finetune_s': seconds}
        print(json.dumps(row), flush=True)
        results.append(row)
  with open(os.path.join(HERE, _RESULTS.value), 'w') as f:
    json.dump({'steps': _STEPS.value, 'lr': _LR.value, 'rows': results}, f, indent=1)

  def cell(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.4f} ± {spread:.4f}'

  print('| level | criterion | parameters | before | pruned | after fine-tune |\n'
        '|---|---|---|---|---|---|')
  for level in _LEVELS.value:
    for criterion in _CRITERIA.value:
      rows = [r for r in results if r['level'] == level and r['criterion'] == criterion]
      print(f"| {level} | {criterion} | {rows[0]['params']} | "
            f"{cell([r['before'] for r in rows])} | {cell([r['after'] for r in rows])} | "
            f"{cell([r['after_finetune'] for r in rows])} |")


if __name__ == '__main__':
  flags.mark_flags_as_required(['data', 'models'])
  app.run(main)
