"""Tokenizers: sentencepiece (trained on the corpus), character-level, byte-level, GPT-2 BPE, and
a Hugging Face model's own (`tokenizer.json` + `tokenizer_config.json`).

All but the last give an exact text round trip: `decode(encode(text)) == text` (GPT-2 BPE: for
text without its special `<|endoftext|>` string). The Hugging Face kind encodes and decodes as
transformers' AutoTokenizer does (BOS/EOS included, as its tokenizer.json's post-processor adds
them), which for some normalizers is not exactly reversible.

A tokenizer lives in a directory: `tokenizer.json` names its kind, plus whatever
files that kind needs (`spm.model` for sentencepiece). `build` trains one and saves
it there; `load` reads it back. The training run keeps it at `<workdir>/tokenizer/`,
so sampling and evaluation rebuild the exact same tokenizer from the workdir alone.

Special tokens (e.g. a chat template's role markers) are added on top of any kind with
`add_special_tokens`: they take the ids after the base vocabulary, are listed in
`tokenizer.json`, and never come out of `encode` (user text cannot forge them).
"""

import abc
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from gpt_jax.errors import ConfigError

_DESCRIPTION_FILE = 'tokenizer.json'
_SPM_MODEL_FILE = 'spm.model'
GPT2_VOCAB_FILE = 'vocab.json'
GPT2_MERGES_FILE = 'merges.txt'
GPT2_EOS = '<|endoftext|>'
# sentencepiece drops training sentences longer than `max_sentence_length` bytes
# (default 4192). We cut lines into chunks of at most this many characters, which
# stays under the limit even when every character takes 4 UTF-8 bytes.
_SPM_MAX_SENTENCE_CHARS = 1000


class Tokenizer(abc.ABC):
  """What the rest of gpt_jax needs from a tokenizer."""

  vocab_size: int
  eos_id: int | None  # Separates documents in the token stream; None: no EOS.

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`. EOS is dropped; partial UTF-8 becomes U+FFFD, never an error."""

  @abc.abstractmethod
  def save(self, directory: str) -> None:
    ...

  def encode_text(self, text: str) -> list[int]:
    """Tokens of `text` alone, without the BOS/EOS that `encode` may add around a document (a
    message inside a conversation, say)."""
    return self.encode(text)


def _write_description(directory: str, description: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _DESCRIPTION_FILE), 'w') as f:
    json.dump(description, f, ensure_ascii=False, indent=2)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model, kept as its serialized proto."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    eos_id = self._sp.eos_id()
    self.eos_id = eos_id if eos_id >= 0 else None

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    # Control pieces (EOS) decode to ''; incomplete byte-fallback sequences to U+FFFD.
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory):
    _write_description(directory, {'kind': 'sentencepiece', 'model': _SPM_MODEL_FILE})
    with open(os.path.join(directory, _SPM_MODEL_FILE), 'wb') as f:
      f.write(self.model_proto)


class CharTokenizer(Tokenizer):
  """One id per character of the training corpus, in sorted order (nanoGPT's shakespeare_char)."""

  eos_id = None  # nanoGPT's char-level setup has no document separator.

  def __init__(self, chars: str):
    self.chars = chars
    self.vocab_size = len(chars)
    self._ids = {c: i for i, c in enumerate(chars)}

  def encode(self, text):
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      raise ConfigError(
          f'Character {e.args[0]!r} is not in the char tokenizer vocabulary '
          f'({self.vocab_size} characters, built from the training split).') from None

  def decode(self, ids):
    return ''.join(self.chars[i] for i in ids)

  def save(self, directory):
    _write_description(directory, {'kind': 'char', 'chars': self.chars})


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, plus EOS = 256."""

  vocab_size = 257
  eos_id = 256

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    # A sampled stream may stop (or wander) mid-character: replace, don't raise.
    return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')

  def save(self, directory):
    _write_description(directory, {'kind': 'byte'})


class GPT2BPETokenizer(Tokenizer):
  """GPT-2's byte-level BPE from its `vocab.json` + `merges.txt` (as Hugging Face ships them).

  Encodes exactly as transformers' GPT2Tokenizer (no prefix space; `<|endoftext|>` is EOS).
  Kept as the two files' bytes, so `save` writes back exactly what was loaded.
  """

  def __init__(self, vocab_json: bytes, merges_txt: bytes):
    import tokenizers  # Only this tokenizer kind needs it.
    self.vocab_json, self.merges_txt = vocab_json, merges_txt
    vocab = json.loads(vocab_json.decode('utf-8'))
    lines = merges_txt.decode('utf-8').splitlines()
    if lines and lines[0].startswith('#version'):
      lines = lines[1:]
    merges = [tuple(line.split(' ')) for line in lines if line]
    self._tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=merges, continuing_subword_prefix='', end_of_word_suffix='',
        fuse_unk=False))
    self._tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    self._tok.decoder = tokenizers.decoders.ByteLevel()
    self.eos_id = vocab.get(GPT2_EOS)
    if self.eos_id is not None:
      self._tok.add_special_tokens([tokenizers.AddedToken(GPT2_EOS, special=True)])
    self.vocab_size = max(vocab.values()) + 1

  @classmethod
  def from_files(cls, directory: str) -> 'GPT2BPETokenizer':
    files = []
    for name in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE):
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'GPT-2 BPE tokenizer file {path} not found.')
      with open(path, 'rb') as f:
        files.append(f.read())
    return cls(*files)

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    # The byte-level decoder replaces incomplete UTF-8 with U+FFFD; EOS (special) is skipped.
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory):
    _write_description(directory, {'kind': 'gpt2_bpe', 'vocab': GPT2_VOCAB_FILE,
                                   'merges': GPT2_MERGES_FILE})
    for name, content in ((GPT2_VOCAB_FILE, self.vocab_json),
                          (GPT2_MERGES_FILE, self.merges_txt)):
      with open(os.path.join(directory, name), 'wb') as f:
        f.write(content)


HF_DIRECTORY = 'huggingface'  # the Hugging Face files, inside a gpt_jax tokenizer directory
HF_TOKENIZER_FILE = 'tokenizer.json'
HF_CONFIG_FILE = 'tokenizer_config.json'
# What a Hugging Face folder may hold about its tokenizer: transformers 5 keeps the chat
# template in chat_template.jinja, earlier versions in tokenizer_config.json.
HF_FILES = (HF_TOKENIZER_FILE, HF_CONFIG_FILE, 'special_tokens_map.json', 'chat_template.jinja')


# tokenizer_config.json's tokenizer_class values whose normalizer, pre-tokenizer and decoder
# transformers 5 rebuilds from its own class definition instead of reading them from
# tokenizer.json (what `_as_transformers_runs` mirrors; other classes run tokenizer.json as is).
_LLAMA_CLASSES = ('LlamaTokenizer', 'LlamaTokenizerFast')
_QWEN2_CLASSES = ('Qwen2Tokenizer', 'Qwen2TokenizerFast')
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _as_transformers_runs(tok, config: dict) -> None:
  """Gives `tok` the pipeline transformers 5's LlamaTokenizer / Qwen2Tokenizer build (their
  __init__), for a tokenizer_config.json naming one of them."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, normalizers, pre_tokenizers
  tokenizer_class = config.get('tokenizer_class')
  prefix_space = config.get('add_prefix_space')
  if tokenizer_class in _LLAMA_CLASSES:
    prefix_space = True if prefix_space is None else prefix_space
    scheme = ('always' if config.get('legacy', False) else 'first') if prefix_space else 'never'
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme=scheme,
                                                 split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=' ', left=1)] if prefix_space else []))
  elif tokenizer_class in _QWEN2_CLASSES:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior='isolated',
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(prefix_space), use_regex=False)])
    tok.decoder = decoders.ByteLevel()


def _token_content(token) -> str | None:
  """A tokenizer_config.json token entry: a string, or an AddedToken as a dict."""
  return token.get('content') if isinstance(token, dict) else token


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face model's tokenizer: its `tokenizer.json` run by the `tokenizers` library as
  transformers' AutoTokenizer runs it (the post-processor adds BOS/EOS; special tokens written
  in the text are matched; LlamaTokenizer's and Qwen2Tokenizer's pipelines as transformers 5
  rebuilds them), `tokenizer_config.json` naming BOS, EOS and the chat template.

  Kept as the folder's files' bytes, so `save` writes back exactly what was loaded.
  """

  def __init__(self, files: dict[str, bytes]):
    import tokenizers  # Only this tokenizer kind and GPT-2 BPE need it.
    self.files = dict(files)
    self._tok = tokenizers.Tokenizer.from_str(files[HF_TOKENIZER_FILE].decode('utf-8'))
    config = json.loads(files.get(HF_CONFIG_FILE, b'{}').decode('utf-8'))
    _as_transformers_runs(self._tok, config)
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self.bos_id = self._id(config, 'bos_token')
    self.eos_id = self._id(config, 'eos_token')
    self.special_ids = frozenset(i for i, token in self._tok.get_added_tokens_decoder().items()
                                 if token.special)
    template = config.get('chat_template')
    if isinstance(template, list):  # named templates: the default one is for chat
      template = {t.get('name'): t.get('template') for t in template}.get('default')
    if 'chat_template.jinja' in files:
      template = files['chat_template.jinja'].decode('utf-8')
    self.chat_template: str | None = template or None
    # What special tokens the template's rendering may name ({{ bos_token }}, ...).
    self.special_tokens = {name: _token_content(config.get(name)) or ''
                           for name in ('bos_token', 'eos_token', 'unk_token', 'pad_token')}

  def _id(self, config: dict, name: str) -> int | None:
    content = _token_content(config.get(name))
    return None if content is None else self._tok.token_to_id(content)

  @classmethod
  def from_directory(cls, directory: str) -> 'HuggingFaceTokenizer':
    if not os.path.isfile(os.path.join(directory, HF_TOKENIZER_FILE)):
      raise FileNotFoundError(f'{os.path.join(directory, HF_TOKENIZER_FILE)} not found')
    files = {}
    for name in HF_FILES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          files[name] = f.read()
    try:
      return cls(files)
    except Exception as e:  # the tokenizers library's parse errors, bad JSON
      raise ConfigError(f'{directory}: cannot read its Hugging Face tokenizer: '
                        f'{str(e).splitlines()[0][:200]}') from None

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def is_special(self, token_id: int) -> bool:
    return token_id in self.special_ids

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=True).ids

  def encode_text(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens of `text` (no BOS/EOS added) and each one's [start, end) characters in it."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory):
    _write_description(directory, {'kind': 'huggingface', 'directory': HF_DIRECTORY})
    os.makedirs(os.path.join(directory, HF_DIRECTORY), exist_ok=True)
    for name, content in self.files.items():
      with open(os.path.join(directory, HF_DIRECTORY, name), 'wb') as f:
        f.write(content)


class WithSpecialTokens(Tokenizer):
  """A base tokenizer plus named special tokens at ids base.vocab_size, base.vocab_size + 1, ..."""

  def __init__(self, base: Tokenizer, names: Sequence[str]):
    self.base, self.names = base, tuple(names)
    self.vocab_size = base.vocab_size + len(self.names)
    self.eos_id = base.eos_id
    self.bos_id = getattr(base, 'bos_id', None)
    self._ids = {name: base.vocab_size + i for i, name in enumerate(self.names)}

  def special_id(self, name: str) -> int:
    return self._ids[name]

  def encode(self, text):
    return self.base.encode(text)

  def encode_text(self, text):
    return self.base.encode_text(text)

  def decode(self, ids):
    return self.base.decode([i for i in ids if i < self.base.vocab_size])

  def save(self, directory):
    self.base.save(directory)
    path = os.path.join(directory, _DESCRIPTION_FILE)
    with open(path) as f:
      description = json.load(f)
    description['special_tokens'] = list(self.names)
    _write_description(directory, description)


def add_special_tokens(tokenizer: Tokenizer, names: Sequence[str]) -> WithSpecialTokens:
  """`tokenizer` with `names` as special tokens (those it has already keep their ids)."""
  if isinstance(tokenizer, WithSpecialTokens):
    new = [n for n in names if n not in tokenizer.names]
    return WithSpecialTokens(tokenizer.base, tokenizer.names + tuple(new))
  return WithSpecialTokens(tokenizer, names)


def special_token_id(tokenizer: Tokenizer, name: str) -> int | None:
  """The id of special token `name`, or None if `tokenizer` does not have it."""
  if isinstance(tokenizer, WithSpecialTokens) and name in tokenizer.names:
    return tokenizer.special_id(name)
  return None


# The special tokens of gpt_jax's chat template (gpt_jax/sft/chat_template.py), added to a
# tokenizer for fine-tuning: one per role, then the end of a turn.
CHAT_ROLES = ('system', 'user', 'assistant')
CHAT_TOKENS = tuple(f'<|{role}|>' for role in CHAT_ROLES) + ('<|end|>',)


def chat_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """The ids of CHAT_TOKENS, when the tokenizer has them all; else ()."""
  ids = tuple(special_token_id(tokenizer, t) for t in CHAT_TOKENS)
  return () if None in ids else ids


def _spm_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Lines of `texts`, cut to sentencepiece's sentence limit, `max_chars` in all.

  sentencepiece trains on "sentences": lines are the natural unit. The newlines
  themselves are not lost: "\\n" is a user-defined piece, always matched whole.
  """
  total = 0
  for text in texts:
    for line in text.split('\n'):
      for start in range(0, len(line), _SPM_MAX_SENTENCE_CHARS):
        chunk = line[start:start + _SPM_MAX_SENTENCE_CHARS]
        yield chunk
        total += len(chunk)
        if total >= max_chars:
          return


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        max_chars: int) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model in memory whose encoding is lossless."""
  model = io.BytesIO()
  try:
    _train_spm(texts, max_chars, vocab_size, model)
  except RuntimeError as e:  # e.g. a corpus too small for the vocabulary asked for
    message = str(e).strip().splitlines()[-1]
    raise ConfigError(f'sentencepiece training with data.vocab_size={vocab_size} failed: '
                      f'{message}') from None
  return SentencePieceTokenizer(model.getvalue())


def _train_spm(texts, max_chars, vocab_size, model):
  spm.SentencePieceTrainer.train(
      sentence_iterator=_spm_sentences(texts, max_chars),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      # Exact round trip: no unicode normalization, keep every space as written
      # (code indentation), no "▁" prepended to each text, and bytes for any
      # character that did not make it into the vocabulary.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      byte_fallback=True,
      allow_whitespace_only_pieces=True,
      user_defined_symbols='\n',
      split_digits=True,
      # <unk>=0 and </s> (EOS, the document separator); no BOS or PAD.
      bos_id=-1,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,  # sentencepiece logs every step to stderr otherwise.
  )


def build(data_config, train_texts: Iterable[str], directory: str) -> Tokenizer:
  """Builds the tokenizer `data_config.tokenizer` names and saves it in `directory`."""
  kind = data_config.tokenizer
  if kind == 'sentencepiece':
    if data_config.spm_model:
      if not os.path.isfile(data_config.spm_model):
        raise FileNotFoundError(
            f'data.spm_model file not found: {data_config.spm_model}')
      with open(data_config.spm_model, 'rb') as f:
        tokenizer = SentencePieceTokenizer(f.read())
    else:
      tokenizer = train_sentencepiece(train_texts, data_config.vocab_size,
                                      data_config.spm_train_chars)
  elif kind == 'char':
    chars = set()
    for text in train_texts:
      chars.update(text)
    if not chars:
      raise ConfigError('The training split is empty: no characters for the char tokenizer.')
    tokenizer = CharTokenizer(''.join(sorted(chars)))
  elif kind == 'byte':
    tokenizer = ByteTokenizer()
  else:
    raise ConfigError(f"Unknown data.tokenizer {kind!r}: use 'sentencepiece', 'char' or 'byte'.")
  tokenizer.save(directory)
  return tokenizer


def load(directory: str) -> Tokenizer:
  """Reads a tokenizer that `Tokenizer.save` wrote to `directory`."""
  path = os.path.join(directory, _DESCRIPTION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No tokenizer in {directory}: {path} is missing.')
  with open(path) as f:
    description = json.load(f)
  base = _load_base(directory, description, path)
  if description.get('special_tokens'):
    return WithSpecialTokens(base, description['special_tokens'])
  return base


def _load_base(directory: str, description: dict, path: str) -> Tokenizer:
  kind = description['kind']
  if kind == 'sentencepiece':
    with open(os.path.join(directory, description['model']), 'rb') as f:
      return SentencePieceTokenizer(f.read())
  if kind == 'char':
    return CharTokenizer(description['chars'])
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'gpt2_bpe':
    return GPT2BPETokenizer.from_files(directory)
  if kind == 'huggingface':
    return HuggingFaceTokenizer.from_directory(os.path.join(directory, description['directory']))
  raise ConfigError(f'{path} names an unknown tokenizer kind {kind!r}.')
