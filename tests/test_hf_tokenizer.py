"""A Hugging Face tokenizer.json in the workdir: the same ids and text as transformers'
AutoTokenizer, BOS/EOS included."""

import os

import pytest

import hf_tokenizers
from gpt_jax import tokenizer as tokenizer_lib

transformers = pytest.importorskip('transformers')

TEXTS = [
    'Hello  world!\n\n  def f(x):\treturn café, 中文 😀👩\u200d💻 end',
    ' leading space,   runs of   spaces\t\ttabs\n\n\n',
    'special tokens written in the text: <|eot_id|> <|im_start|>user</s> [INST] x [/INST]<s>',
    '',
    'naïve façade – “quotes” … ½ Ω ß İ',
    'ｆｕｌｌｗｉｄｔｈ, cafe\u0301, \r\n    def f(x):\n        return x  \ntrailing   ',
]


@pytest.fixture(scope='module', params=sorted(hf_tokenizers.STYLES))
def style_dir(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  return request.param, hf_tokenizers.build(directory, request.param)


def test_encode_decode_equal_transformers(style_dir, tmp_path):
  style, directory = style_dir
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  # Through the workdir: saved with a gpt_jax tokenizer description, loaded back.
  tokenizer_lib.HuggingFaceTokenizer.from_directory(directory).save(str(tmp_path / 'tok'))
  ours = tokenizer_lib.load(str(tmp_path / 'tok'))
  assert isinstance(ours, tokenizer_lib.HuggingFaceTokenizer)
  assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
  assert ours.vocab_size == len(theirs)
  for text in TEXTS + hf_tokenizers.corpus()[:3]:
    ids = ours.encode(text)
    assert ids == theirs(text)['input_ids'], text
    assert (ids[:1] == [ours.bos_id]) == (style != 'qwen2')
    assert ours.encode_text(text) == theirs(text, add_special_tokens=False)['input_ids']
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    if style == 'llama3':  # no normalizer (Qwen2's is NFC): an exact round trip of plain text
      plain = text.split('special tokens')[0]
      assert ours.decode(ours.encode(plain)) == plain
  assert ours.chat_template == hf_tokenizers.STYLES[style]['template']


def test_chat_template_file_and_errors(tmp_path):
  directory = hf_tokenizers.build(str(tmp_path / 'jinja'), 'qwen2', template_file=True)
  tokenizer = tokenizer_lib.HuggingFaceTokenizer.from_directory(directory)
  assert tokenizer.chat_template == hf_tokenizers.QWEN2_TEMPLATE and tokenizer.bos_id is None
  with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
    f.write('{"not": "a tokenizer"}')
  with pytest.raises(tokenizer_lib.ConfigError, match='cannot read its Hugging Face tokenizer'):
    tokenizer_lib.HuggingFaceTokenizer.from_directory(directory)


def test_token_cache_digest_covers_the_files(style_dir, tmp_path):
  """gpt_jax.data keys its token cache by the tokenizer's files, here in a subdirectory."""
  from gpt_jax import data
  style, directory = style_dir
  digest = data._tokenizer_digest  # pylint: disable=protected-access
  load = tokenizer_lib.HuggingFaceTokenizer.from_directory
  other = hf_tokenizers.build(str(tmp_path / 'other'), style, vocab_size=350)
  assert digest(load(directory)) == digest(load(directory)) != digest(load(other))
