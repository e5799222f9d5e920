"""Tokenizers: exact round trips, save/load, clear errors."""

import os
import pathlib

import ml_collections
import pydoc_data.topics
import pytest

from gpt_jax import tokenizer as tokenizer_lib

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / '../shared/data/tinyshakespeare.txt'

# Everything a whitespace-collapsing or normalizing tokenizer would get wrong.
ODD_TEXT = ('  leading spaces\n\n\nempty lines,\trepeated    spaces\t\ttabs\n'
            'ｆｕｌｌｗｉｄｔｈ, caf\u00e9 vs cafe\u0301, CJK 中文字符, emoji 😀🎉👩‍💻\r\n'
            '    def f(x):\n        return x  \ntrailing spaces   ')


def data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      tokenizer='sentencepiece', vocab_size=512, spm_model='', spm_train_chars=1_000_000))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def pydoc_texts():
  topics = pydoc_data.topics.topics
  return [topics[name] for name in sorted(topics)]


@pytest.fixture(scope='module')
def spm_dir(pydoc_texts, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('spm'))
  tokenizer_lib.build(data_config(), pydoc_texts, directory)
  return directory


def test_sentencepiece_round_trip(spm_dir, pydoc_texts):
  tokenizer = tokenizer_lib.load(spm_dir)
  assert tokenizer.vocab_size == 512
  assert tokenizer.eos_id is not None
  for text in [ODD_TEXT, pydoc_texts[0], '', ' ', '\n']:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # It learned something: fewer tokens than bytes (~1.9 bytes a token at this size).
  assert len(tokenizer.encode(pydoc_texts[0])) < 0.6 * len(pydoc_texts[0].encode())
  # EOS separates documents and disappears when decoding.
  assert tokenizer.decode(tokenizer.encode('a') + [tokenizer.eos_id]) == 'a'


def test_sentencepiece_save_load_and_given_model(spm_dir, tmp_path):
  trained = tokenizer_lib.load(spm_dir)
  given = tokenizer_lib.build(
      data_config(spm_model=os.path.join(spm_dir, 'spm.model')), [], str(tmp_path / 'given'))
  reloaded = tokenizer_lib.load(str(tmp_path / 'given'))
  for tokenizer in [given, reloaded]:
    assert tokenizer.vocab_size == trained.vocab_size
    assert tokenizer.encode(ODD_TEXT) == trained.encode(ODD_TEXT)


def test_missing_spm_model_names_the_path(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer_lib.build(data_config(spm_model=missing), [], str(tmp_path / 'tok'))


def test_unknown_kind_names_the_field(tmp_path):
  with pytest.raises(ValueError, match='data.tokenizer'):
    tokenizer_lib.build(data_config(tokenizer='wordpiece'), [], str(tmp_path / 'tok'))


def test_char_round_trip_save_load(tmp_path):
  tokenizer = tokenizer_lib.build(data_config(tokenizer='char'), [ODD_TEXT], str(tmp_path))
  assert tokenizer.eos_id is None
  assert tokenizer.vocab_size == len(set(ODD_TEXT))
  assert tokenizer.decode(tokenizer.encode(ODD_TEXT)) == ODD_TEXT
  reloaded = tokenizer_lib.load(str(tmp_path))
  assert reloaded.encode(ODD_TEXT) == tokenizer.encode(ODD_TEXT)
  with pytest.raises(ValueError, match="'Z'"):
    tokenizer.encode('Z')


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason='needs ../shared/data/tinyshakespeare.txt')
def test_char_tinyshakespeare_has_65_symbols(tmp_path):
  text = SHAKESPEARE.read_text(encoding='utf-8')
  tokenizer = tokenizer_lib.build(data_config(tokenizer='char'), [text], str(tmp_path))
  assert tokenizer.vocab_size == 65  # As in nanoGPT's shakespeare_char.
  assert tokenizer.decode(tokenizer.encode(text[:1000])) == text[:1000]


def test_byte_round_trip_and_partial_utf8(tmp_path):
  tokenizer = tokenizer_lib.build(data_config(tokenizer='byte'), [], str(tmp_path))
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
  ids = tokenizer.encode(ODD_TEXT)
  assert tokenizer.decode(ids + [tokenizer.eos_id]) == ODD_TEXT
  assert tokenizer_lib.load(str(tmp_path)).encode(ODD_TEXT) == ids
  # A sampler may stop in the middle of a character: replace, don't raise.
  assert tokenizer.decode(tokenizer.encode('ok 😀')[:-2]) == 'ok \ufffd'
