"""Corpus cleaning (gpt_jax.datasets.clean): planted duplicates found, filters tripped, PII
redacted, a killed run resumed, and the output trained on."""

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pydoc_data.topics
import pytest

from conftest import REPO, module_env, read_metrics, run_module, train

pytest.importorskip('datatrove')
from datatrove.data import Document  # pylint: disable=g-import-not-at-top
from datatrove.pipeline.dedup import MinhashDedupSignature
from gpt_jax.datasets import cleaning

EMAILS = ('jane.doe@corp-mail.com', 'ops+alerts@big-company.org')
PUBLIC_IPS = ('93.184.216.34', '151.101.1.69')
PHONES = ('+1 415-555-0132', '(212) 555-0187')
PRIVATE_IP = '192.168.1.20'  # not PII: datatrove replaces public addresses only
REPLACEMENTS = re.compile(r'email@example\.com|firstname\.lastname@example\.org|555-0100|'
                          r'22\.214\.171\.124|126\.96\.36\.199|188\.8\.131\.52|184\.108\.40\.206|'
                          r'220\.127\.116\.11|18\.104\.22\.168')


def random_document(rng, vocabulary, words=300):
  """Sentences of words drawn from a Zipf-like distribution: common words recur across
  documents, as in real text, so distinct documents share some 5-grams."""
  weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
  tokens = rng.choices(vocabulary, weights, k=words)
  sentences, i = [], 0
  while i < len(tokens):
    n = rng.randint(8, 18)
    sentences.append(' '.join(tokens[i:i + n]).capitalize() + '.')
    i += n
  return ' '.join(sentences)


def edit_words(rng, text, fraction, vocabulary):
  words = text.split(' ')
  for i in rng.sample(range(len(words)), max(1, round(len(words) * fraction))):
    words[i] = rng.choice(vocabulary)
  return ' '.join(words)


def shingle_jaccard(a, b, directory):
  """Word 5-gram Jaccard similarity as datatrove's MinHash sees the texts."""
  step = MinhashDedupSignature(str(directory), config=cleaning.minhash_config(0.8),
                               language=cleaning.PlainTokenizer())
  sa, sb = set(step.get_shingles(a).ravel()), set(step.get_shingles(b).ravel())
  return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """400 distinct documents, 20 exact copies (some differing only in whitespace), 60 copies with
  1% or 1.5% of their words replaced (word 5-gram Jaccard similarity 0.85-0.93), and 4
  documents holding emails, IPs and phone numbers; in 4 JSONL files, shuffled."""
  rng = random.Random(0)
  vocabulary = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9)))
                for _ in range(3000)]
  distinct = {f'doc{i}': random_document(rng, vocabulary) for i in range(400)}
  records = [{'id': k, 'text': v} for k, v in distinct.items()]
  originals = list(distinct)
  exact = {f'exact{i}': originals[i] for i in range(20)}
  for i, (copy, original) in enumerate(exact.items()):
    text = distinct[original]
    records.append({'id': copy, 'text': text.replace('. ', '.  ', 3) if i % 2 else text})
  near = {f'near{i}': originals[100 + i] for i in range(60)}
  for i, (copy, original) in enumerate(near.items()):
    fraction = 0.01 if i % 2 else 0.015
    records.append({'id': copy, 'text': edit_words(rng, distinct[original], fraction, vocabulary)})
  pii = {}
  for i in range(4):
    text = random_document(rng, vocabulary, words=120)
    pii[f'pii{i}'] = (f'{text} Write to {EMAILS[i % 2]} or call {PHONES[i % 2]}. The server '
                      f'{PUBLIC_IPS[i % 2]} forwards to {PRIVATE_IP} inside.')
    records.append({'id': f'pii{i}', 'text': pii[f'pii{i}']})
  rng.shuffle(records)
  directory = tmp_path_factory.mktemp('corpus')
  for shard in range(4):
    with open(directory / f'part{shard}.jsonl', 'w') as f:
      for record in records[shard::4]:
        f.write(json.dumps(record) + '\n')
  texts = {r['id']: r['text'] for r in records}
  return {'glob': str(directory / '*.jsonl'), 'texts': texts, 'distinct': distinct,
          'exact': exact, 'near': near, 'pii': pii}


def clean_args(corpus, out):
  return [f'--input={corpus["glob"]}', f'--out={out}', '--filters=', '--redact_pii']


def output_documents(out):
  documents = []
  for name in sorted(os.listdir(os.path.join(out, 'text'))):
    with open(os.path.join(out, 'text', name), encoding='utf-8') as f:
      documents += [d for d in f.read().split(cleaning.DOCUMENT_SEPARATOR) if d]
  return documents


@pytest.fixture(scope='module')
def cleaned(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('cleaned'))
  proc = run_module('gpt_jax.datasets.clean', *clean_args(corpus, out))
  return {'out': out, 'stdout': proc.stdout, 'documents': output_documents(out)}


def test_planted_duplicates_are_removed_and_distinct_documents_kept(corpus, cleaned, tmp_path):
  kept = collections.Counter(cleaned['documents'])
  texts = corpus['texts']
  # Of each exact copy and its original, one is kept.
  for copy, original in corpus['exact'].items():
    assert kept[texts[copy]] + kept[texts[original]] - (texts[copy] == texts[original]) == 1, copy
  similarities = [shingle_jaccard(texts[c], texts[o], tmp_path) for c, o in corpus['near'].items()]
  assert 0.84 < min(similarities) and max(similarities) < 0.95, similarities
  found = sum(kept[texts[c]] + kept[texts[o]] == 1 for c, o in corpus['near'].items())
  recall = found / len(corpus['near'])
  assert recall >= 0.95, (recall, similarities)
  planted = set(corpus['exact'].values()) | set(corpus['near'].values())
  unplanted = [k for k in corpus['distinct'] if k not in planted]
  lost = sum(kept[texts[k]] == 0 for k in unplanted)
  assert lost / len(unplanted) <= 0.01, lost
  # The report counts the same.
  with open(os.path.join(cleaned['out'], 'report.json')) as f:
    report = json.load(f)
  assert report['documents_in'] == len(texts)
  assert report['removed']['exact'] == len(corpus['exact'])
  assert report['removed']['minhash'] == found
  assert report['documents_out'] == len(cleaned['documents']) == len(texts) - 20 - found
  assert 'minhash' in cleaned['stdout'] and 'text_files=' in cleaned['stdout']


def test_pii_is_replaced_and_the_rest_is_byte_identical(corpus, cleaned):
  kept = cleaned['documents']
  for original in corpus['pii'].values():
    prefix = original[:200]
    (redacted,) = [d for d in kept if d.startswith(prefix)]
    for secret in EMAILS + PUBLIC_IPS + PHONES:
      assert secret not in redacted
    assert PRIVATE_IP in redacted
    secrets = re.compile('|'.join(re.escape(s) for s in EMAILS + PUBLIC_IPS + PHONES))
    assert REPLACEMENTS.split(redacted) == secrets.split(original)
  # Documents without PII come out as they went in.
  inputs = set(corpus['texts'].values())
  assert sum(d in inputs for d in kept) == len(kept) - len(corpus['pii'])


def test_killed_run_resumed_ends_like_uninterrupted_run(corpus, cleaned, tmp_path):
  out = str(tmp_path / 'resumed')
  command = [sys.executable, '-m', 'gpt_jax.datasets.clean', *clean_args(corpus, out)]
  proc = subprocess.Popen(command, cwd=REPO, env=module_env(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  completions = os.path.join(out, 'work', 'logs', 'filter', 'completions')
  deadline = time.time() + 60
  while not (os.path.isdir(completions) and os.listdir(completions)) and time.time() < deadline:
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
  proc.wait()
  assert not os.path.exists(os.path.join(out, 'report.json'))  # it did stop part way
  run_module('gpt_jax.datasets.clean', *clean_args(corpus, out))
  for name in os.listdir(os.path.join(cleaned['out'], 'text')):
    with open(os.path.join(cleaned['out'], 'text', name), 'rb') as a, \
        open(os.path.join(out, 'text', name), 'rb') as b:
      assert a.read() == b.read(), name
  reports = []
  for directory in (cleaned['out'], out):
    with open(os.path.join(directory, 'report.json')) as f:
      report = json.load(f)
    reports.append({k: v for k, v in report.items() if not k.endswith('seconds')})
  assert reports[0] == reports[1]


def test_cleaned_output_trains(cleaned, tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  train(workdir, tfds_dir, **{'data.text_files': os.path.join(cleaned['out'], 'text', '*.txt'),
                              'data.tfds_name': '', 'data.tokenizer': 'byte', 'data.vocab_size': 256,
                              'train.num_steps': 2, 'train.log_every': 1,
                              'train.eval_every': 0, 'optim.warmup_steps': 1})
  losses = read_metrics(workdir, 'train_loss')
  assert sorted(losses) == [1, 2] and all(0 < loss < 10 for loss in losses.values())


# --------------------------------------------------------------------- filters, in this process

TRIPS = {
    # Too few words, and no stop words.
    'gopher': 'Buy now. Cheap pills. Best price online. Click here today.',
    # Curly brackets (code or templates) drop the whole document.
    'c4': 'The function returns {"status": "ok"} to its caller. ' * 6,
    # The same line again and again.
    'repetition': '\n'.join(['Subscribe to our newsletter for the latest deals and offers.'] * 40),
}
# Of CPython's pydoc topics (79 documents, 465 KB in 3.11), each filter keeps at least this
# share of the documents: Gopher drops 5 topics under 50 words and a few mostly-code ones; C4
# drops the ones with a curly bracket (dict and set syntax); repetition a few repetitive ones.
PYDOC_KEPT = {'gopher': 0.85, 'c4': 0.75, 'repetition': 0.9}


def passes(step, text):
  result = step.filter(Document(text=text, id='x'))
  return result is True or (isinstance(result, tuple) and result[0])


@pytest.mark.parametrize('name', cleaning.FILTERS)
def test_each_filter_removes_its_junk_and_keeps_most_builtin_documents(name):
  step = cleaning.quality_filter(name)
  assert not passes(step, TRIPS[name])
  documents = [cleaning.WhitespaceFormatter().format(t) for t in pydoc_data.topics.topics.values()]
  kept = sum(passes(step, text) for text in documents) / len(documents)
  assert kept >= PYDOC_KEPT[name], kept


def test_minhash_threshold_sets_the_buckets():
  assert cleaning.minhash_buckets(0.8) == 14  # datatrove's default configuration
  assert cleaning.detection_probability(0.8, 0.8) >= 0.92
  assert cleaning.detection_probability(0.85, 0.8) > 0.98
  assert cleaning.detection_probability(0.5, 0.8) < 0.06
  assert cleaning.minhash_buckets(0.9) < 14 < cleaning.minhash_buckets(0.7)


def test_cluster_executors_chain_the_same_stages(corpus, tmp_path):
  config = cleaning.CleanConfig(input=corpus['glob'], out=str(tmp_path / 'slurm'),
                                executor='slurm',
                                executor_args=(('partition', 'cpu'), ('time', '01:00:00')))
  stages = cleaning.executors(config, report_step=None)
  assert cleaning.stage_names(stages) == ['filter', 'exact', 'minhash_signatures',
                                          'minhash_buckets', 'minhash_clusters', 'write', 'report']
  assert [s.tasks for s in stages] == [4, 1, 4, 14, 1, 4, 1]
  assert all(later.depends is earlier for earlier, later in zip(stages, stages[1:]))
  with pytest.raises(cleaning.ConfigError, match='partition=...'):
    cleaning.executors(cleaning.CleanConfig(corpus['glob'], str(tmp_path / 's2'), executor='slurm'),
                       report_step=None)
  with pytest.raises(cleaning.ConfigError, match="no argument 'partitionn'"):
    cleaning.executors(cleaning.CleanConfig(corpus['glob'], str(tmp_path / 's3'), executor='ray',
                                            executor_args=(('partitionn', 'x'),)), report_step=None)


def test_bad_input_and_missing_datatrove_give_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match='matches no files'):
    cleaning.input_files(str(tmp_path / 'none*.jsonl'))
  (tmp_path / 'a.csv').write_text('x')
  with pytest.raises(cleaning.ConfigError, match='a.csv'):
    cleaning.input_format(['a.csv'])
  with pytest.raises(cleaning.ConfigError, match='unknown filter'):
    cleaning.quality_filter('gopherr')
  # An output directory remembers the settings of its run: no mixing of two runs' tasks.
  config = cleaning.CleanConfig(input=str(tmp_path / 'a.csv'), out=str(tmp_path / 'out'))
  cleaning.claim_output(config, ['a.csv'])
  cleaning.claim_output(config, ['a.csv'])  # the same run, resumed
  with pytest.raises(cleaning.ConfigError, match='other filters'):
    cleaning.claim_output(cleaning.CleanConfig(config.input, config.out, filters=('c4',)), ['a.csv'])
  # Without datatrove installed: which extra to install.
  script = ("import sys, runpy; sys.modules['datatrove'] = None; "
            "sys.argv = ['clean', '--input=x', '--out=y']; "
            "runpy.run_module('gpt_jax.datasets.clean', run_name='__main__')")
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=module_env(),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip() == ("error: datatrove is not installed; it comes with gpt_jax's "
                                 "[clean] extra: pip install -e '.[clean]'")
