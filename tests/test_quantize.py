"""int8 quantization: per-channel scales, memory, closeness to float, the int8 x int8 products of
int8_dynamic against a float reference, and that the generator, the serving engine and the
sample binary decode from the int8 weights."""

import dataclasses
import os
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from gpt_jax import backends, checkpoint, config as config_lib, decode
from gpt_jax.inference import engine, quantize
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

GPT2 = ModelConfig(vocab_size=257, max_len=64, num_layers=2, num_heads=4, emb_dim=64,
                   mlp_dim=256)
LLAMA = dataclasses.replace(GPT2, position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                            tie_embeddings=False, num_kv_heads=2)
PROMPTS = [[1, 2, 3], list(range(10, 27)), [9]]


def _params(cfg, seed=0):
  init = jax.jit(lambda key: Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32)))
  return nn.unbox(init(jax.random.key(seed)))['params']


def test_quantize_tensor_per_output_channel():
  w = np.random.default_rng(0).normal(size=(16, 4, 8)).astype(np.float32)
  w[:, 1, 2] = 0  # an all-zero channel
  w[:, 3, 5] *= 100  # one large channel does not coarsen the others
  q = quantize.quantize_tensor(w, (0,))
  assert q.values.dtype == jnp.int8 and q.values.shape == w.shape
  assert q.scale.dtype == jnp.float32 and q.scale.shape == (1, 4, 8)
  np.testing.assert_allclose(q.scale[0], np.abs(w).max(axis=0) / 127 + (w[0] == 0) * 1.0,
                             rtol=1e-6)
  error = np.abs(np.asarray(q.dequantize()) - w)
  assert np.all(error <= np.asarray(q.scale) / 2 + 1e-7)
  assert np.abs(np.asarray(q.values)).max() == 127
  assert np.all(np.asarray(q.dequantize())[:, 1, 2] == 0)


@pytest.mark.parametrize('cfg', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_quantized_params_memory_and_logits(cfg):
  params = _params(cfg)
  q = quantize.quantize_params(params)
  names = {'/'.join(str(k.key) for k in path) for path, leaf in
           jax.tree_util.tree_leaves_with_path(q, is_leaf=lambda x: isinstance(x, quantize.Int8))
           if isinstance(leaf, quantize.Int8)}
  expected = {'wte/embedding'} | {f'block_{i}/{m}/{p}/kernel' for i in range(2) for m, ps in
                                  (('attn', ('query', 'key', 'value', 'out')),
                                   ('mlp', ('fc_in', 'fc_out') + (('fc_gate',)
                                                                  if cfg.mlp == 'swiglu' else ())))
                                  for p in ps}
  if not cfg.tie_embeddings:
    expected.add('lm_head/kernel')
  assert names == expected
  assert quantize.is_quantized(q) and not quantize.is_quantized(params)
  ratio = quantize.param_bytes(params) / quantize.param_bytes(q)
  assert 3.0 < ratio < 4.0, ratio  # norms, biases and positions stay float32

  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 257, (2, 32)), jnp.int32)
  forward = jax.jit(lambda p: Transformer(cfg).apply({'params': quantize.dequantize(p)}, tokens)[0])
  ref, out = forward(params), forward(q)
  assert float(jnp.abs(out - ref).max()) < 0.02 * float(jnp.abs(ref).max())
  assert float(jnp.abs(out - ref).max()) > 0  # it did change the weights


@pytest.mark.parametrize('rows', [1, 5])
def test_int8_products_exact_and_dynamic_matmul_within_its_bound(rows):
  rng = np.random.default_rng(rows)
  # int32 sums of int8 products are exact: the same as numpy's in int64.
  a = rng.integers(-127, 128, (rows, 96)).astype(np.int8)
  b = rng.integers(-127, 128, (96, 40)).astype(np.int8)
  expected = a.astype(np.int64) @ b.astype(np.int64)
  for w, transposed in ((b, False), (b.T.copy(), True)):
    out = jax.jit(backends.int8_matmul, static_argnums=2)(a, w, transposed)
    assert out.dtype == jnp.int32 and np.array_equal(np.asarray(out), expected)

  # x @ w through per-row int8 activations and per-channel int8 weights. With x = xq * sx + ex
  # (|ex| <= sx / 2) and w = wq * sw + ew (|ew| <= sw / 2), the error of each output is at most
  # sx / 2 * sum_k |w_k| + sw / 2 * sum_k |x_k| + sx * sw / 4 * k (plus float32 rounding).
  x = rng.normal(size=(rows, 96)).astype(np.float32)
  x[0, 3] = 20.0  # an outlier feature coarsens its own token's scale only
  w = rng.normal(size=(96, 4, 10)).astype(np.float32)
  kernel = quantize.quantize_tensor(w, (0,), quantize.DynamicInt8)
  sx = np.abs(x).max(axis=1, keepdims=True) / 127
  sw = np.asarray(kernel.scale).reshape(1, -1)
  flat = w.reshape(96, -1).astype(np.float64)
  bound = (sx / 2 * np.abs(flat).sum(0) + sw / 2 * np.abs(x).sum(1, keepdims=True)
           + sx * sw / 4 * 96 + 1e-4)
  reference = x.astype(np.float64) @ flat
  major = backends.to_output_major({'fc_in': {'kernel': kernel}})['fc_in']['kernel']
  for held in (kernel, major):  # the trained layout and output-major ([out, in])
    out = np.asarray(jax.jit(quantize.dynamic_matmul)(x, held))
    error = np.abs(out - reference)
    assert np.all(error <= bound), (error / bound).max()
    assert error.max() > 0
  if rows > 1:  # tokens without the outlier: within 2% of their largest output
    assert np.abs(out - reference)[1:].max() < 0.02 * np.abs(reference[1:]).max()


def engine_greedy(params, prompts, max_new: int) -> list[list[int]]:
  """Each prompt's greedy tokens from a 2-slot serving engine."""
  batcher = engine.Engine(GPT2, params, slots=2).start()
  try:
    outs, finished = [[] for _ in prompts], threading.Semaphore(0)
    for prompt, out in zip(prompts, outs):
      batcher.submit(engine.Sequence(prompt, max_new, lambda t, out=out: out.append(t) and False,
                                      lambda reason, error: finished.release(), temperature=0))
    for _ in prompts:
      assert finished.acquire(timeout=60)
    return outs
  finally:
    batcher.stop()


def test_int8_dynamic_in_both_layouts_and_decoding_in_the_engine():
  params = _params(GPT2)
  q = quantize.apply(params, 'int8_dynamic')
  assert quantize.param_bytes(q) == quantize.param_bytes(quantize.apply(params, 'int8'))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 257, (2, 32)), jnp.int32)
  model = Transformer(GPT2)
  ref = model.apply({'params': params}, tokens)[0]

  def forward(p, output_major):
    with backends.output_major_projections(output_major):
      return quantize.apply_model(model, p, tokens)[0]
  out = jax.jit(forward, static_argnums=1)(q, False)
  assert 0 < float(jnp.abs(out - ref).max()) < 0.02 * float(jnp.abs(ref).max())
  # Kernels held [out, in] for decoding (backends.to_output_major) give the same logits.
  major = jax.jit(forward, static_argnums=1)(backends.to_output_major(q), True)
  np.testing.assert_allclose(major, out, atol=1e-5, rtol=1e-5)

  prompts = PROMPTS[:2]
  greedy = quantize.generator(GPT2, q).generate(prompts, 8, temperature=0)
  assert engine_greedy(q, prompts, 8) == greedy


def test_generator_and_engine_decode_from_int8_weights():
  params = _params(GPT2)
  q = quantize.quantize_params(params)
  gen = quantize.generator(GPT2, q)
  greedy = gen.generate(PROMPTS, 12, temperature=0)
  # The same as float decoding of the dequantized weights: the int8 values are what it reads.
  assert greedy == decode.Generator(GPT2, quantize.dequantize(q)).generate(PROMPTS, 12,
                                                                           temperature=0)

  assert engine_greedy(q, PROMPTS, 12) == greedy  # 3 sequences on 2 slots: one waits
  with pytest.raises(ConfigError, match='--quantize must be one of'):
    quantize.apply(params, 'int4')


def test_sample_binary_with_int8_dynamic(tmp_path):
  params = _params(GPT2)
  config = config_lib.base_config()
  config.model.update(dataclasses.asdict(GPT2))
  workdir = str(tmp_path / 'w')
  checkpoint.save_config(workdir, config)
  tokenizer_lib.ByteTokenizer().save(os.path.join(workdir, 'tokenizer'))
  checkpoint.save_params(workdir, 0, params)
  # The flag reaches quantize.apply whatever the mode: one binary run covers both.
  proc = run_module('gpt_jax.sample', f'--workdir={workdir}', '--prompt=int8 ',
                    '--max_new_tokens=16', '--temperature=0', '--quantize=int8_dynamic')
  tokens = quantize.generator(GPT2, quantize.apply(params, 'int8_dynamic')).generate(
      [list(b'int8 ')], 16, temperature=0, eos_id=256)[0]
  assert proc.stdout == 'int8 ' + tokenizer_lib.ByteTokenizer().decode(tokens) + '\n'
  proc = run_module('gpt_jax.sample', f'--workdir={workdir}', '--quantize=int4', check=False)
  assert proc.returncode != 0 and 'int4' in proc.stderr
