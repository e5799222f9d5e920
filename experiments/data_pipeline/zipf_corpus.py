"""`zipf_corpus`: a synthetic TFDS text corpus of a chosen size, generated locally and offline.

Words are drawn from a fixed vocabulary of 50,000 pseudo-words (2-12 letters) with Zipf's law
(frequency of rank r proportional to 1 / r^1.1, as in English), one sentence of 5-30 words per
line; document lengths are log-normal around 2.6 KB (web pages). The
seed is fixed, so a size names one corpus. Importing this module registers the builder:

    tfds.builder('zipf_corpus/mb2048', data_dir=...).download_and_prepare(
        file_format='array_record')
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

VOCABULARY = 50_000
ZIPF_EXPONENT = 1.1
MEAN_DOCUMENT_WORDS = 500
VALIDATION_DOCUMENTS = 2000


@dataclasses.dataclass(eq=False)
class ZipfConfig(tfds.core.BuilderConfig):
  train_bytes: int = 0


def _words(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The vocabulary as one byte array, each word's offset and length, and the Zipf CDF."""
  lengths = np.clip(rng.poisson(5, VOCABULARY) + 2, 2, 12)
  lengths = np.sort(lengths, kind='stable')  # frequent words are short, as in English
  letters = rng.integers(ord('a'), ord('z') + 1, lengths.sum(), dtype=np.uint8)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  weights = 1.0 / np.arange(1, VOCABULARY + 1) ** ZIPF_EXPONENT
  return letters, offsets, lengths, np.cumsum(weights) / weights.sum()


def documents(seed: int, total_bytes: int | None, count: int | None = None):
  """Yields document texts until `total_bytes` (or `count` documents) are out."""
  rng = np.random.default_rng(seed)
  letters, offsets, lengths, cdf = _words(rng)
  produced = made = 0
  while (total_bytes is None or produced < total_bytes) and (count is None or made < count):
    n = max(5, int(rng.lognormal(np.log(MEAN_DOCUMENT_WORDS), 0.8)))
    ids = np.searchsorted(cdf, rng.random(n))
    word_lengths = lengths[ids]
    # Gather the words' letters, each followed by one separator byte.
    ends = np.cumsum(word_lengths + 1)
    out = np.full(ends[-1], ord(' '), np.uint8)
    starts = ends - word_lengths - 1
    positions = _letter_positions(starts, word_lengths)
    out[positions] = letters[np.repeat(offsets[ids], word_lengths)
                             + (positions - np.repeat(starts, word_lengths))]
    # One sentence of 5-30 words per line.
    sentence_ends = np.cumsum(rng.integers(5, 31, n))
    out[ends[sentence_ends[sentence_ends < n] - 1] - 1] = ord('\n')
    text = out[:-1].tobytes().decode('ascii')
    produced += len(text)
    made += 1
    yield text


def _letter_positions(starts: np.ndarray, word_lengths: np.ndarray) -> np.ndarray:
  """Positions of every letter: start of its word plus its index within the word."""
  total = word_lengths.sum()
  word_of_letter = np.repeat(np.arange(len(starts)), word_lengths)
  first_letter = np.concatenate([[0], np.cumsum(word_lengths)[:-1]])
  return starts[word_of_letter] + np.arange(total) - first_letter[word_of_letter]


class ZipfCorpus(tfds.core.GeneratorBasedBuilder):
  """Synthetic English-like text with Zipf-distributed words."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ZipfConfig(name=f'mb{mb}', train_bytes=mb * 2**20,
                                description=f'{mb} MiB of training text')
                     for mb in (16, 512, 2048)]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True)  # already random; skips TFDS's shuffling pass over the corpus

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(seed=0, total_bytes=self.builder_config.train_bytes),
            'validation': self._generate_examples(seed=1, count=VALIDATION_DOCUMENTS)}

  def _generate_examples(self, seed, total_bytes=None, count=None):
    for index, text in enumerate(documents(seed, total_bytes, count)):
      yield index, {'text': text}
