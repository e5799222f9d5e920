"""Decoding: batches, EOS and stop strings, per-request lengths, determinism, streaming text,
compilation reuse, and the sample binary's one-line errors."""

import dataclasses
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from gpt_jax import checkpoint, config as config_lib, decode
from gpt_jax.inference import quantize
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.decode import PAD, Generator
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, init_cache
from gpt_jax.sample import check_flags

CFG = ModelConfig(vocab_size=257, max_len=64, num_layers=1, num_heads=4, emb_dim=32, mlp_dim=64)
PROMPTS = [[1, 2, 3], list(range(10, 27)), [9]]


@pytest.fixture(scope='module')
def params():
  """Parameters in the trained layout (a Generator holds its own layout: backends/cpu/decode_layout.py)."""
  return nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']


@pytest.fixture(scope='module')
def generator(params):
  return Generator(CFG, params)


LONG = dataclasses.replace(CFG, max_len=256)


@pytest.fixture(scope='module')
def long_generator():
  """A context of 256 tokens: long requests grow the decoding loop's cache (cache_windows)."""
  init = Transformer(LONG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return Generator(LONG, nn.unbox(init)['params'])


def collect(stream):
  """Rows of a token stream, PAD dropped."""
  steps = np.stack(list(stream), axis=1)
  return [[int(t) for t in row if t != PAD] for row in steps]


def test_sampling_is_deterministic_and_stream_equals_generate(generator):
  sampling = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3)
  a = generator.generate(PROMPTS, 12, num_samples=2, seed=3, **sampling)
  assert len(a) == 6 and all(len(row) == 12 for row in a)
  assert a == generator.generate(PROMPTS, 12, num_samples=2, seed=3, **sampling)
  assert a == collect(generator.stream(PROMPTS, 12, num_samples=2, seed=3, **sampling))
  assert a != generator.generate(PROMPTS, 12, num_samples=2, seed=4, **sampling)
  assert a[0] != a[1]  # two samples of one prompt differ
  greedy = generator.generate(PROMPTS, 12, temperature=0)
  assert greedy == collect(generator.stream(PROMPTS, 12, temperature=0))
  assert greedy == generator.generate(PROMPTS, 12, temperature=0, repetition_penalty=1.0)


def test_eos_and_per_request_max_new_tokens(generator):
  greedy = generator.generate(PROMPTS, 10, temperature=0)
  eos = greedy[0][4]
  first_eos = [row.index(eos) + 1 if eos in row else 10 for row in greedy]
  out = generator.generate(PROMPTS, 10, temperature=0, eos_id=eos)
  assert out == [row[:n] for row, n in zip(greedy, first_eos)]
  assert out[0][-1] == eos
  limits = [3, 7, 5]
  out = generator.generate(PROMPTS, limits, temperature=0)
  assert out == [row[:n] for row, n in zip(greedy, limits)]
  steps = list(generator.stream(PROMPTS, limits, temperature=0))
  assert len(steps) == 7 and list(steps[5]) == [PAD, greedy[1][5], PAD]


def test_context_limit_error_or_truncation(generator):
  with pytest.raises(ConfigError, match="exceeds the model's context of 64 tokens.*keeps its "
                                        'last 54'):
    generator.generate([list(range(1, 61))], 10)
  with pytest.raises(ConfigError, match='max_new_tokens must be positive'):
    generator.generate([[1]], 0)
  with pytest.raises(ConfigError, match=r'top_p must be in \(0, 1\]'):
    generator.generate([[1]], 4, top_p=0)
  long_prompt = list(range(1, 61))
  assert (generator.generate([long_prompt], 10, temperature=0, truncate=True)
          == generator.generate([long_prompt[-54:]], 10, temperature=0))


def test_compiles_once_per_batch_and_length_bucket(params):
  gen = Generator(CFG, params)
  for n, prompt_len, temperature, seed in ((5, 3, 0.7, 0), (4, 12, 1.3, 1), (2, 1, 0.5, 2)):
    gen.generate([[7] * prompt_len, [8] * 5], n, temperature=temperature, top_p=0.9, seed=seed)
  assert gen._generate._cache_size() == 1  # same rows, buckets (16, 16) and mode
  gen.generate([[7] * 20, [8] * 5], 4, temperature=0.7, top_p=0.9)  # prompt bucket 32
  assert gen._generate._cache_size() == 2


class _ScriptedGenerator:
  """Streams given token rows, as Generator.stream would (PAD after a row ends)."""

  def __init__(self, rows):
    self.rows = rows

  def stream(self, prompts, max_new_tokens, *, eos_id, num_samples, **_):
    width = max(len(r) for r in self.rows)
    for t in range(width):
      yield np.array([r[t] if t < len(r) else PAD for r in self.rows])


def test_stream_text_whole_characters_and_stop_strings():
  tok = tokenizer_lib.ByteTokenizer()
  text = 'héllo wörld 😀 a STx STOP never'
  rows = [tok.encode(text), tok.encode('中文') + [tok.eos_id, 65]]
  pieces = list(decode.stream_text(_ScriptedGenerator(rows), tok, ['', ''], 99,
                                   stop=['STOP']))
  assert all('\ufffd' not in piece for _, piece in pieces)
  assert ''.join(p for r, p in pieces if r == 0) == 'héllo wörld 😀 a STx '
  assert ''.join(p for r, p in pieces if r == 1) == '中文'
  assert len([p for r, p in pieces if r == 0]) > 10  # streamed, not at the end
  texts = decode.generate_text(_ScriptedGenerator(rows), tok, ['', ''], 99, stop=['wör', 'x'])
  assert texts == ['héllo ', '中文']


def _workdir(path, params, tokenizer) -> str:
  config = config_lib.base_config()
  config.model.update(dataclasses.asdict(CFG))
  checkpoint.save_config(str(path), config)
  if tokenizer:
    tokenizer.save(os.path.join(path, 'tokenizer'))
  checkpoint.save_params(str(path), 0, params)
  return str(path)


def test_sample_binary_streams_and_fails_in_one_line(generator, params, tmp_path):
  workdir = _workdir(tmp_path / 'w', params, tokenizer_lib.ByteTokenizer())
  proc = run_module('gpt_jax.sample', f'--workdir={workdir}', '--prompt=café ',
                    '--max_new_tokens=20', '--temperature=0')
  expected = tokenizer_lib.ByteTokenizer().decode(
      generator.generate([list('café '.encode())], 20, temperature=0, eos_id=256)[0])
  assert proc.stdout == 'café ' + expected + '\n'

  no_tokenizer = _workdir(tmp_path / 'no_tok', params, None)
  proc = run_module('gpt_jax.sample', f'--workdir={no_tokenizer}', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'error: No tokenizer in {no_tokenizer}/tokenizer: {no_tokenizer}/tokenizer/tokenizer.json '
      'is missing.']
  proc = run_module('gpt_jax.sample', f'--workdir={workdir}', '--top_p=1.5', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ['error: --top_p must be in (0, 1] (1: off), got 1.5']


@pytest.mark.parametrize('flag, message', [
    (dict(max_new_tokens=0), '--max_new_tokens must be positive, got 0'),
    (dict(temperature=-0.5), '--temperature must be >= 0'),
    (dict(top_p=0.0), r'--top_p must be in \(0, 1\]'),
    (dict(top_p=1.01), r'--top_p must be in \(0, 1\]'),
    (dict(num_samples=0), '--num_samples must be positive'),
    (dict(repetition_penalty=0.0), '--repetition_penalty must be > 0'),
    (dict(workdir=''), '--workdir is required'),
])
def test_sample_flag_validation(flag, message, tmp_path):
  flags = dict(workdir=str(tmp_path), max_new_tokens=10, temperature=0.8, top_k=0, top_p=1.0,
               num_samples=1, repetition_penalty=1.0)
  with pytest.raises(ConfigError, match=message):
    check_flags(types.SimpleNamespace(**{**flags, **flag}))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    check_flags(types.SimpleNamespace(**{**flags, 'workdir': str(tmp_path / 'missing')}))


def test_ids_past_the_tokenizer_vocabulary_are_never_drawn(generator, params):
  # A random model at a high temperature draws nearly uniformly over its 257 rows, so without
  # the restriction about 1 token in 5 would fall in the top 57 rows.
  sampling = dict(temperature=5.0, num_samples=4, seed=1)
  unrestricted = np.concatenate(generator.generate(PROMPTS, 20, **sampling))
  assert (unrestricted >= 200).any()
  restricted = Generator(CFG, params, num_tokens=200)
  drawn = np.concatenate(restricted.generate(PROMPTS, 20, **sampling))
  assert drawn.size == len(PROMPTS) * 4 * 20 and (drawn < 200).all()


@pytest.mark.parametrize('vocab', [512, 257, 300])
def test_greedy_tokens_is_the_first_argmax(vocab):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, vocab)).astype(np.float32)
  logits[0, [7, 130]] = 9.0            # a tie in two chunks: the first wins
  logits[1, [127, 128]] = 9.0          # a tie across a chunk boundary
  logits[2, :] = -np.inf
  logits[2, vocab - 1] = 0.0           # all but the last id masked
  logits[3, :] = 1.0                   # all equal
  logits[4, [vocab - 2, vocab - 1]] = 9.0
  np.testing.assert_array_equal(decode.greedy_tokens(jnp.asarray(logits)),
                                np.argmax(logits, axis=-1))


def test_cache_windows_double_up_to_the_cache_length():
  assert decode.cache_windows(16, 256) == [64, 128, 256]
  assert decode.cache_windows(16, 200) == [64, 128, 200]
  assert decode.cache_windows(16, 32) == [32]
  assert decode.cache_windows(128, 1024) == [128, 256, 512, 1024]


def test_generate_through_growing_caches_equals_streaming_over_one(long_generator):
  # Rows of 3, 50, 1 and 64 prompt tokens and 150 new ones: generate's loop attends over 64,
  # then 128, then 256 slots, each row passing the windows' ends at its own step (the last row
  # fills the first window with its prompt); stream attends over one cache of 256 slots.
  prompts = [[1, 2, 3], list(range(10, 60)), [9], list(range(100, 164))]
  assert decode.cache_windows(64, 256) == [64, 128, 256]
  greedy = long_generator.generate(prompts, 150, temperature=0)
  assert greedy == collect(long_generator.stream(prompts, 150, temperature=0))
  sampling = dict(temperature=0.9, top_k=40, seed=5)
  sampled = long_generator.generate(prompts, 150, **sampling)
  assert sampled == collect(long_generator.stream(prompts, 150, **sampling))
  eos = greedy[1][100]  # ends row 1 (at least) in the last window
  assert (long_generator.generate(prompts, 150, temperature=0, eos_id=eos)
          == collect(long_generator.stream(prompts, 150, temperature=0, eos_id=eos)))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='checks XLA:CPU buffer assignment')
@pytest.mark.cpu
@pytest.mark.parametrize('rows', [1, 3])
def test_decoding_loop_updates_the_cache_in_place(long_generator, rows):
  # A copy of a cache-sized buffer in the compiled loop costs a cache read and write per layer
  # per token: the batch-1 decoding loop once held 4 per k or v array per token.
  req = long_generator._request([[1, 2, 3]] * rows, 200, 1, False, None, 0, temperature=0)  # pylint: disable=protected-access
  compiled = long_generator._generate.lower(  # pylint: disable=protected-access
      long_generator.params, req.tokens, req.lengths, req.max_new, req.dynamic, mode=req.mode,
      cache_len=req.cache_len).compile()
  text = compiled.as_text()
  body_names = re.findall(r' while\(.*body=%([\w.-]+)', text)
  assert len(body_names) == len(decode.cache_windows(req.tokens.shape[1], req.cache_len))
  cache_shape = re.compile(rf'= f32\[{rows},{CFG.kv_heads},\d+,{CFG.head_dim}\]')
  for body_name in body_names:
    body = re.search(rf'^%{re.escape(body_name)} .*?^}}', text, re.M | re.S).group(0)
    copies = [line for line in body.splitlines()
              if cache_shape.search(line) and ' copy(' in line]
    assert not copies, copies[:2]


LLAMA = dataclasses.replace(CFG, position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                            tie_embeddings=False, num_kv_heads=2)


@pytest.mark.parametrize('cfg, quantized', [(CFG, False), (LLAMA, True)],
                         ids=['gpt2-float32', 'llama-int8'])
def test_output_major_kernels_compute_what_the_trained_layout_does(cfg, quantized):
  params = nn.unbox(Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
  leaves, treedef = jax.tree.flatten(params['params'])
  noise = [0.05 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
  params = treedef.unflatten([x + n for x, n in zip(leaves, noise)])  # biases start at zero
  if quantized:
    params = quantize.quantize_params(params)
  major = quantize.generator(cfg, params, output_major=True)
  trained = quantize.generator(cfg, params, output_major=False)
  kernel = major.params['block_0']['mlp']['fc_in']['kernel']
  assert (kernel.values if quantized else kernel).shape == (cfg.mlp_dim, cfg.emb_dim)
  # 2 rows x 8 tokens take the kernel-on-the-left product, 2 x 40 the other one.
  for width in (8, 40):
    tokens = jax.random.randint(jax.random.key(2), (2, width), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
    cache = init_cache(cfg, 2)
    ours, _ = major._apply(major.params, tokens, positions, cache)  # pylint: disable=protected-access
    reference, _ = trained._apply(trained.params, tokens, positions, cache)  # pylint: disable=protected-access
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=1e-5)
  sampling = dict(temperature=0.8, top_k=20, num_samples=2, seed=3)
  assert major.generate(PROMPTS, 12, **sampling) == trained.generate(PROMPTS, 12, **sampling)
