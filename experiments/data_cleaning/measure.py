"""Measures gpt_jax.datasets.clean: throughput, peak memory and what each stage removes on a
synthetic corpus with planted duplicates and junk, and what the default filters keep of tiny
Shakespeare and CPython's pydoc topics. See README.md.

    python experiments/data_cleaning/measure.py --size_mb=200 --work=/tmp/clean_exp \
        --shakespeare=/path/to/tinyshakespeare.txt --results=experiments/data_cleaning/results.json
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import psutil

STOP_WORDS = ['the', 'of', 'and', 'to', 'a', 'in', 'is', 'that', 'with', 'be', 'for', 'have']
SPAM = ('Buy now', 'Cheap pills', 'Best price', 'Click here', 'Free shipping', 'Limited offer',
        'Act fast', 'Win big')


class Corpus:
  """Documents of Zipf-distributed pseudo-words (English stop words the most frequent), in
  sentences and paragraphs, and planted copies, near copies and junk."""

  def __init__(self, seed=0):
    self.rng = random.Random(seed)
    letters = 'abcdefghijklmnopqrstuvwxyz'
    words = STOP_WORDS + [''.join(self.rng.choice(letters) for _ in range(self.rng.randint(2, 10)))
                          for _ in range(30_000)]
    self.words = words
    weights = [1 / (rank + 1) ** 1.05 for rank in range(len(words))]
    total, self.cumulative = 0.0, []
    for w in weights:
      total += w
      self.cumulative.append(total)

  def document(self, words=None):
    n = words or int(self.rng.lognormvariate(6.0, 0.6)) + 60  # ~480 words, long tail
    tokens = self.rng.choices(self.words, cum_weights=self.cumulative, k=n)
    paragraphs, sentence, paragraph = [], [], []
    for token in tokens:
      sentence.append(token)
      if len(sentence) >= self.rng.randint(8, 20):
        paragraph.append(' '.join(sentence).capitalize() + '.')
        sentence = []
        if len(paragraph) >= self.rng.randint(3, 6):
          paragraphs.append(' '.join(paragraph))
          paragraph = []
    paragraph += [' '.join(sentence).capitalize() + '.'] if sentence else []
    paragraphs += [' '.join(paragraph)] if paragraph else []
    return '\n\n'.join(paragraphs)

  def near_copy(self, text, fraction):
    words = text.split(' ')
    for i in self.rng.sample(range(len(words)), max(1, round(len(words) * fraction))):
      words[i] = self.rng.choice(self.words[len(STOP_WORDS):])
    return ' '.join(words)

  def junk(self, kind):
    if kind == 'spam':  # short, no stop words: Gopher's quality rules
      return '\n'.join(f'{self.rng.choice(SPAM)}!' for _ in range(self.rng.randint(3, 12)))
    if kind == 'template':  # a curly bracket or lorem ipsum: C4's rules
      body = self.document(120)
      if self.rng.random() < 0.5:
        return body + '\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.'
      return body + '\n\nvar config = {"theme": "dark", "items": 12};'
    # The same lines over and over: Gopher's repetition rules
    line = self.document(15).replace('\n', ' ')
    return '\n'.join([line] * self.rng.randint(10, 40) + [self.document(40)])


def make_corpus(directory, size_mb, files=64):
  """JSONL files of ~size_mb MB: 78% distinct documents, 8% exact copies (half with whitespace
  changes), 8% near copies (1-2% of words replaced), 6% junk; and the ground truth."""
  corpus = Corpus()
  os.makedirs(directory, exist_ok=True)
  handles = [open(os.path.join(directory, f'part{i:03d}.jsonl'), 'w') for i in range(files)]
  written, truth, distinct = 0, {'exact': [], 'near': [], 'junk': {}, 'distinct': []}, []
  i = 0
  while written < size_mb * 1e6:
    roll = corpus.rng.random()
    if roll < 0.08 and distinct:
      original_id, original = corpus.rng.choice(distinct)
      text = original if corpus.rng.random() < 0.5 else original.replace('. ', '.  ', 2)
      doc_id = f'exact{i}'
      truth['exact'].append((doc_id, original_id))
    elif roll < 0.16 and distinct:
      original_id, original = corpus.rng.choice(distinct)
      fraction = corpus.rng.choice((0.01, 0.015, 0.02))
      text = corpus.near_copy(original, fraction)
      doc_id = f'near{i}'
      truth['near'].append((doc_id, original_id, fraction))
    elif roll < 0.22:
      kind = ('spam', 'template', 'repetition')[i % 3]
      text, doc_id = corpus.junk(kind), f'junk{i}'
      truth['junk'][doc_id] = kind
    else:
      text, doc_id = corpus.document(), f'doc{i}'
      truth['distinct'].append(doc_id)
      if len(distinct) < 20_000:
        distinct.append((doc_id, text))
      else:
        distinct[corpus.rng.randrange(len(distinct))] = (doc_id, text)
    line = json.dumps({'id': doc_id, 'text': text}) + '\n'
    handles[i % files].write(line)
    written += len(text.encode())
    i += 1
  for handle in handles:
    handle.close()
  return truth, written


def run_clean(args, env, label):
  """Runs the command, sampling the resident memory of it and its workers every 0.2 s."""
  start = time.time()
  proc = subprocess.Popen([sys.executable, '-m', 'gpt_jax.datasets.clean', *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  peak, root = 0, psutil.Process(proc.pid)
  while proc.poll() is None:
    try:
      rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
      peak = max(peak, rss)
    except psutil.Error:
      pass
    time.sleep(0.2)
  out = proc.stdout.read()
  if proc.returncode:
    raise SystemExit(f'{label} failed ({proc.returncode})')
  return time.time() - start, peak, out


def removed_ids(out, stage):
  ids = set()
  folder = os.path.join(out, 'removed', stage)
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    with open(os.path.join(folder, name)) as f:
      ids.update(json.loads(line)['id'] for line in f)
  return ids


def score(out, truth):
  """Planted duplicates found, junk removed, distinct documents lost, against the ground truth."""
  dedup = removed_ids(out, 'exact') | removed_ids(out, 'minhash')
  filters = {name: removed_ids(out, name) for name in ('gopher', 'c4', 'repetition')}
  any_filter = set().union(*filters.values())
  def found(pairs):  # a pair is missed when both copy and original are in the output
    pairs = [(c, o) for c, o, *_ in pairs if c not in any_filter and o not in any_filter]
    return round(sum(c in dedup or o in dedup for c, o in pairs) / len(pairs), 4)
  originals = {pair[1] for pair in truth['exact'] + truth['near']}
  unplanted = [d for d in truth['distinct'] if d not in originals]
  junk_removed = {}
  for kind in ('spam', 'template', 'repetition'):
    ids = [d for d, k in truth['junk'].items() if k == kind]
    junk_removed[kind] = sum(d in any_filter for d in ids) / len(ids)
  return {'exact_recall': found(truth['exact']),
          'near_recall': {f: found([p for p in truth['near'] if p[2] == f]) for f in (0.01, 0.015, 0.02)},
          'junk_removed': junk_removed,
          'distinct_removed_by_dedup': sum(d in dedup for d in unplanted) / len(unplanted),
          'distinct_removed_by_filters': sum(d in any_filter for d in truth['distinct']) /
                                         len(truth['distinct'])}


def filters_keep(texts):
  """Per filter alone, and for the default chain: documents and characters kept."""
  from datatrove.data import Document  # pylint: disable=import-outside-toplevel
  from gpt_jax.datasets import cleaning  # pylint: disable=import-outside-toplevel
  texts = [cleaning.WhitespaceFormatter().format(t) for t in texts]
  chars = sum(map(len, texts))
  result = {}
  for name in (*cleaning.FILTERS, 'chain'):
    steps = [cleaning.quality_filter(n) for n in (cleaning.FILTERS if name == 'chain' else [name])]
    kept_docs = kept_chars = 0
    for text in texts:
      document = Document(text=text, id='x')
      if all(step.filter(document) is True for step in steps):
        kept_docs += 1
        kept_chars += len(document.text)
    result[name] = {'documents': f'{kept_docs}/{len(texts)}', 'characters': round(kept_chars / chars, 3)}
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--size_mb', type=float, default=200)
  parser.add_argument('--work', default='/tmp/clean_exp')
  parser.add_argument('--workers', default='1,2')
  parser.add_argument('--shakespeare', default='')
  parser.add_argument('--results', default='')
  args = parser.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo)
  results = {'date': time.strftime('%Y-%m-%d'), 'cpus': os.cpu_count(),
             'load_before': os.getloadavg()[0]}

  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, repo)
  results['keep'] = {'pydoc_topics': filters_keep(list(pydoc_data.topics.topics.values()))}
  if args.shakespeare:
    with open(args.shakespeare) as f:
      text = f.read()
    lines = text.split('\n')
    chunks = ['\n'.join(lines[i:i + 100]) for i in range(0, len(lines), 100)]
    results['keep']['shakespeare_whole'] = filters_keep([text])
    results['keep']['shakespeare_100_lines'] = filters_keep(chunks)
  print(json.dumps(results['keep'], indent=1), flush=True)

  corpus_dir = os.path.join(args.work, 'corpus')
  shutil.rmtree(args.work, ignore_errors=True)
  start = time.time()
  truth, size = make_corpus(corpus_dir, args.size_mb)
  results['corpus'] = {'bytes': size, 'documents': sum(len(v) for v in truth.values()),
                       'exact_copies': len(truth['exact']), 'near_copies': len(truth['near']),
                       'junk': len(truth['junk']), 'seconds_to_make': round(time.time() - start)}
  print(results['corpus'], flush=True)
  results['runs'] = []
  for workers in map(int, args.workers.split(',')):
    out = os.path.join(args.work, f'out_w{workers}')
    seconds, peak, stdout = run_clean([f'--input={corpus_dir}/*.jsonl', f'--out={out}',
                                       f'--workers={workers}'], env, f'workers={workers}')
    with open(os.path.join(out, 'report.json')) as f:
      report = json.load(f)
    run = {'workers': workers, 'seconds': round(seconds, 1), 'mb_per_s': round(size / 1e6 / seconds, 3),
           'peak_rss_gb': round(peak / 1e9, 2), 'load_after': os.getloadavg()[0],
           'report': report, 'score': score(out, truth)}
    print(stdout, json.dumps({k: v for k, v in run.items() if k != 'report'}), flush=True)
    results['runs'].append(run)
  if args.results:
    with open(args.results, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
