"""datatrove's default English tokenizer (spacy) against gpt_jax.datasets.cleaning.PlainTokenizer
in the three places the cleaner uses words or sentences: what each decides and how long it takes.
Needs spacy (pip install spacy), which the cleaner itself does not. See README.md.

    python experiments/data_cleaning/word_splitting.py --shakespeare=/path/to/tinyshakespeare.txt
"""

import argparse
import tempfile
import time

import pydoc_data.topics
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter
from datatrove.utils.text import split_into_words

from gpt_jax.datasets import cleaning


def decide(step, texts):
  start = time.time()
  decisions = []
  for text in texts:
    document = Document(text=text, id='x')
    decisions.append((step.filter(document) is True, document.text))
  return decisions, time.time() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shakespeare', required=True)
  args = parser.parse_args()
  with open(args.shakespeare) as f:
    lines = f.read().split('\n')
  corpora = {
      'pydoc topics (79)': [cleaning.WhitespaceFormatter().format(t)
                            for t in pydoc_data.topics.topics.values()],
      'Shakespeare, 100-line chunks (401)': ['\n'.join(lines[i:i + 100])
                                             for i in range(0, len(lines), 100)],
  }
  split_into_words('Load spacy before timing.')
  plain = cleaning.PlainTokenizer()
  c4 = dict(filter_no_terminal_punct=False, min_words_per_line=-1)
  steps = {
      'gopher': (GopherQualityFilter(), GopherQualityFilter(language=plain)),
      'c4': (C4QualityFilter(**c4), C4QualityFilter(**c4, language=plain)),
  }
  print('| filter | corpus | kept, spacy | kept, plain | same decision and text | seconds spacy / plain |')
  print('|---|---|---|---|---|---|')
  for name, (with_spacy, with_plain) in steps.items():
    for corpus, texts in corpora.items():
      a, seconds_a = decide(with_spacy, texts)
      b, seconds_b = decide(with_plain, texts)
      print(f'| {name} | {corpus} | {sum(k for k, _ in a)} | {sum(k for k, _ in b)} | '
            f'{sum(x == y for x, y in zip(a, b))} | {seconds_a:.2f} / {seconds_b:.2f} '
            f'({seconds_a / seconds_b:.0f}x) |')
  # MinHash shingles of the simplified text: the same set of word 5-grams?
  with tempfile.TemporaryDirectory() as directory:
    config = cleaning.minhash_config(0.8)
    spacy_step = MinhashDedupSignature(directory, config=config)
    plain_step = MinhashDedupSignature(directory, config=config, language=plain)
    for corpus, texts in corpora.items():
      start = time.time()
      a = [set(spacy_step.get_shingles(t).ravel()) for t in texts]
      middle = time.time()
      b = [set(plain_step.get_shingles(t).ravel()) for t in texts]
      end = time.time()
      jaccard = sum(len(x & y) / max(len(x | y), 1) for x, y in zip(a, b)) / len(a)
      print(f'| minhash shingles | {corpus} | mean Jaccard spacy vs plain {jaccard:.3f} | | | '
            f'{middle - start:.2f} / {end - middle:.2f} ({(middle - start) / (end - middle):.0f}x) |')


if __name__ == '__main__':
  main()
