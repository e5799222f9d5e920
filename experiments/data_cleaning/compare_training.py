"""Trains the same small model for the same number of tokens on the raw and on the cleaned
synthetic corpus of measure.py, and evaluates both on held-out clean documents. See README.md.

    python experiments/data_cleaning/compare_training.py --work=/tmp/clean_exp --steps=600
"""

import argparse
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # pylint: disable=wrong-import-position

MODEL = {'model.num_layers': 2, 'model.num_heads': 4, 'model.emb_dim': 128, 'model.mlp_dim': 512,
         'model.max_len': 128, 'model.dropout': 0.0, 'data.seq_len': 128, 'data.batch_size': 16,
         'data.tokenizer': 'byte', 'data.vocab_size': 256, 'data.val_fraction': 0.01,
         'train.measure_peak': False, 'train.progress_bar': False, 'train.sample_tokens': 0,
         'train.eval_every': 0, 'optim.warmup_steps': 50}


def raw_shards(corpus_dir, out_dir):
  """The raw JSONL corpus as text shards, documents separated as the cleaner separates them."""
  os.makedirs(out_dir, exist_ok=True)
  for path in sorted(glob.glob(os.path.join(corpus_dir, '*.jsonl'))):
    with open(path) as f:
      texts = [json.loads(line)['text'] for line in f]
    name = os.path.basename(path).replace('.jsonl', '.txt')
    with open(os.path.join(out_dir, name), 'w') as f:
      f.write(''.join(t + '\n\n' for t in texts))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--work', default='/tmp/clean_exp')
  parser.add_argument('--cleaned', default='out_w1', help='measure.py output folder under --work')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--heldout_documents', type=int, default=400)
  parser.add_argument('--results', default='')
  args = parser.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  raw_shards(os.path.join(args.work, 'corpus'), os.path.join(args.work, 'raw_text'))
  corpus = measure.Corpus()  # the same vocabulary and word frequencies, new documents
  corpus.rng.seed(12345)
  heldout = os.path.join(args.work, 'heldout')
  os.makedirs(heldout, exist_ok=True)
  with open(os.path.join(heldout, 'clean.txt'), 'w') as f:
    f.write(''.join(corpus.document() + '\n\n' for _ in range(args.heldout_documents)))
  results = {'steps': args.steps, 'tokens': args.steps * 16 * 128, 'model': MODEL}
  for name, files in (('raw', os.path.join(args.work, 'raw_text', '*.txt')),
                      ('cleaned', os.path.join(args.work, args.cleaned, 'text', '*.txt'))):
    workdir = os.path.join(args.work, f'train_{name}_{args.steps}')
    overrides = {**MODEL, 'data.text_files': files, 'train.num_steps': args.steps,
                 'train.log_every': args.steps // 4,
                 'data.tfds_data_dir': os.path.join(args.work, 'tfds')}
    subprocess.run([sys.executable, '-m', 'gpt_jax.train', '--config=configs/default.py',
                    f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()]],
                   cwd=repo, env=env, check=True, capture_output=True)
    # The held-out files' train split: their first 99% (data.val_fraction), unseen in training.
    proc = subprocess.run([sys.executable, '-m', 'gpt_jax.eval', f'--workdir={workdir}',
                           f'--text_files={heldout}/*.txt', '--split=train', '--progress_bar=false'],
                          cwd=repo, env=env, check=True, capture_output=True, text=True)
    evals = glob.glob(os.path.join(workdir, 'eval', '*.json'))
    with open(max(evals, key=os.path.getmtime)) as f:
      results[name] = json.load(f)
    print(name, proc.stdout.strip(), flush=True)
  if args.results:
    with open(args.results, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
