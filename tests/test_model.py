"""The model in isolation: causality, layouts, KV-cache decoding, sharding rules."""

import contextlib
import dataclasses
import io
import re

import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib, sharding
from gpt_jax.errors import ConfigError
from gpt_jax.decode import Generator, sample_logits
from gpt_jax.model import (ModelConfig, Projection, Transformer, masked_attention,
                            unstack_layers)

GPT2 = dict()
LLAMA = dict(position='rope', norm='rmsnorm', mlp='swiglu', num_kv_heads=2, use_bias=False,
             tie_embeddings=False)
QK_NORM = dict(LLAMA, qk_norm=True)


def make(layout, **kw):
  cfg = ModelConfig(vocab_size=61, max_len=48, num_layers=2, num_heads=4, emb_dim=32,
                    mlp_dim=64, **{**layout, **kw})
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  return cfg, model, params


@pytest.mark.parametrize('layout', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_causal(layout):
  _, model, params = make(layout)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 61)
  logits, _ = model.apply({'params': params}, tokens)
  for t in (0, 7, 18):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 61)
    logits2, _ = model.apply({'params': params}, changed)
    np.testing.assert_array_equal(logits[:, :t + 1], logits2[:, :t + 1])
    assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:])


@pytest.mark.parametrize('layout', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_logits_at_selects_tokens_of_the_full_forward(layout):
  _, model, params = make(layout)
  tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, 61)
  full, _ = model.apply({'params': params}, tokens)
  at = jnp.array([[19, 0], [4, 4], [11, 18]])
  selected, _ = model.apply({'params': params}, tokens, logits_at=at)
  assert selected.shape == (3, 2, 61)
  np.testing.assert_allclose(selected, jnp.take_along_axis(full, at[:, :, None], axis=1),
                             atol=1e-5, rtol=1e-5)


def test_gpt2_layout_parameters():
  """GPT-2 layout: learned positions, LayerNorm with bias, tied embeddings (no lm_head)."""
  cfg, _, params = make(GPT2)
  assert params['wpe'].shape == (48, 32)
  assert 'lm_head' not in params
  assert set(params['block_0']['ln_1']) == {'scale', 'bias'}
  assert params['block_0']['attn']['query']['kernel'].shape == (32, 4, 8)
  assert params['block_0']['mlp']['fc_in']['bias'].shape == (64,)
  _, _, llama = make(LLAMA)
  assert 'wpe' not in llama and 'lm_head' in llama
  assert llama['block_0']['attn']['key']['kernel'].shape == (32, 2, 8)  # 2 kv heads


@pytest.mark.parametrize('x_shape,kernel_shape,num_inputs,einsum', [
    ((2, 5, 6), (6, 3, 4), 1, 'bte,ehd->bthd'),   # query/key/value: embed -> heads x head_dim
    ((2, 5, 3, 4), (3, 4, 6), 2, 'bthd,hde->bte'),  # out: heads x head_dim -> embed
])
def test_projection_as_one_2d_product_equals_the_einsum(x_shape, kernel_shape, num_inputs, einsum):
  layer = Projection(shape=kernel_shape, num_inputs=num_inputs, use_bias=True,
                     dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = layer.init(jax.random.key(1), x)['params']
  assert params['kernel'].shape == kernel_shape
  assert params['bias'].shape == kernel_shape[num_inputs:]

  def ours(params, x):
    return layer.apply({'params': params}, x)

  def reference(params, x):
    return jnp.einsum(einsum, x, params['kernel']) + params['bias']

  np.testing.assert_allclose(ours(params, x), reference(params, x), rtol=1e-5, atol=1e-5)
  grads, expected = (jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
                     for f in (ours, reference))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               expected)


@pytest.mark.parametrize('layout', [GPT2, LLAMA, QK_NORM], ids=['gpt2', 'llama', 'qk_norm'])
def test_greedy_decoding_equals_full_forward_argmax(layout):
  cfg, model, params = make(layout)
  generator = Generator(cfg, params)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [9]]
  outputs = generator.generate(prompts, 12, temperature=0)
  # Full forward passes over the sequence so far; causal, so right-padding changes nothing.
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens)[0])
  for prompt, output in zip(prompts, outputs):
    assert len(output) == 12
    sequence = list(prompt)
    for token in output:
      padded = np.zeros((1, cfg.max_len), np.int32)
      padded[0, :len(sequence)] = sequence
      assert int(jnp.argmax(forward(padded)[0, len(sequence) - 1])) == token
      sequence.append(token)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
  cfg, model, params = make(QK_NORM)
  for name in ('q_norm', 'k_norm'):  # RMSNorm over each head's dims
    assert params['block_0']['attn'][name]['scale'].shape == (cfg.head_dim,)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 61)

  def scaled(params, factor):
    attn = dict(params['block_0']['attn'])
    for name in ('query', 'key'):
      attn[name] = {'kernel': attn[name]['kernel'] * factor}
    return {**params, 'block_0': {**params['block_0'], 'attn': attn}}

  logits = model.apply({'params': params}, tokens)[0]
  np.testing.assert_allclose(model.apply({'params': scaled(params, 7.0)}, tokens)[0], logits,
                             rtol=1e-4, atol=1e-4)
  _, plain_model, plain_params = make(LLAMA)  # without qk_norm the scale matters
  assert not np.allclose(plain_model.apply({'params': scaled(plain_params, 7.0)}, tokens)[0],
                         plain_model.apply({'params': plain_params}, tokens)[0], atol=1e-3)


def test_decoding_rejects_too_long_requests():
  cfg, _, params = make(GPT2)
  with pytest.raises(ValueError, match='exceeds the model.s context of 48 tokens'):
    Generator(cfg, params).generate([[1] * 40], 10)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = lambda **kw: {int(sample_logits(logits, jax.random.key(i), 1.0, **kw)[0])
                        for i in range(200)}
  assert draws(top_k=2, top_p=1.0) == {0, 1}
  assert draws(top_k=0, top_p=0.7) == {0, 1}
  assert draws(top_k=0, top_p=0.4) == {0}
  assert draws(top_k=0, top_p=1.0) == {0, 1, 2, 3}


def test_every_parameter_has_a_rule_and_unknown_names_fail():
  cfg = ModelConfig(vocab_size=61, max_len=16, num_layers=1, num_heads=2, emb_dim=16, mlp_dim=32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0),
                                                       jnp.zeros((1, 4), jnp.int32)))
  specs = nn.get_partition_spec(boxed)['params']
  sharding.check_rules(specs, sharding.LOGICAL_RULES)  # the default table covers the model
  rules = tuple((n, a) for n, a in sharding.LOGICAL_RULES if n != 'mlp')
  with pytest.raises(ValueError, match="No sharding rule for logical axis 'mlp'"):
    sharding.check_rules(specs, rules)


def test_mesh_shape_resolution_and_errors():
  mesh = lambda **kw: {'data': 1, 'fsdp': 1, 'tensor': 1, **kw}
  assert sharding.mesh_shape(mesh(data=-1, tensor=2), 8) == (4, 1, 2)
  with pytest.raises(ValueError, match='needs 6 devices but 8 are available'):
    sharding.mesh_shape(mesh(data=3, fsdp=2), 8)
  with pytest.raises(ValueError, match='do not divide the 8 available devices'):
    sharding.mesh_shape(mesh(data=-1, fsdp=3), 8)


def test_remat_and_scan_change_nothing_numerically():
  base = ModelConfig(vocab_size=61, max_len=32, num_layers=3, num_heads=4, emb_dim=32, mlp_dim=64)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  scanned_cfg = dataclasses.replace(base, scan_layers=True)
  scanned = nn.unbox(Transformer(scanned_cfg).init(jax.random.key(0), tokens)['params'])
  assert scanned['blocks']['attn']['query']['kernel'].shape == (3, 32, 4, 8)  # layer axis first
  loop_cfg, params = unstack_layers(scanned_cfg, scanned)
  assert loop_cfg == base and 'block_2' in params
  np.testing.assert_allclose(Transformer(scanned_cfg).apply({'params': scanned}, tokens)[0],
                             Transformer(base).apply({'params': params}, tokens)[0], atol=1e-5)

  def grads(cfg):
    return jax.jit(jax.grad(lambda p: Transformer(cfg).apply({'params': p}, tokens)[0].std()))(
        params)
  reference = grads(base)
  # Unrolling the scan: the same parameters from init, the same gradients as the loop.
  unrolled_cfg = dataclasses.replace(scanned_cfg, scan_unroll=3)
  unrolled = nn.unbox(Transformer(unrolled_cfg).init(jax.random.key(0), tokens)['params'])
  for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
    np.testing.assert_array_equal(a, b)
  unrolled_grads = jax.jit(jax.grad(
      lambda p: Transformer(unrolled_cfg).apply({'params': p}, tokens)[0].std()))(unrolled)
  for a, b in zip(jax.tree.leaves(unstack_layers(unrolled_cfg, unrolled_grads)[1]),
                  jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for policy in ('full', 'dots_saveable', 'projections'):
    for a, b in zip(jax.tree.leaves(grads(dataclasses.replace(base, remat=policy))),
                    jax.tree.leaves(reference)):
      np.testing.assert_array_equal(a, b)


def test_scan_unroll_and_eval_batch_size_are_checked():
  config = config_lib.base_config()
  config.model.scan_unroll = 0
  with pytest.raises(ConfigError, match='config.model.scan_unroll must be positive, got 0'):
    config_lib.validate(config)
  config.model.scan_unroll = 2
  config.data.eval_batch_size = -1
  with pytest.raises(ConfigError, match='data.eval_batch_size must be 0 .data.batch_size. or '
                     'positive, got -1'):
    config_lib.validate(config)


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (8, 2), (4, 1)])
def test_masked_attention_equals_jax_dot_product_attention(heads, kv_heads):
  b, t, d = 2, 12, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  weights = jax.random.normal(keys[3], (b, t, heads, d))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.array([[0] * t, [0] * 5 + [1] * (t - 5)])  # row 1: two packed sequences
  mask = ((positions[:, None, :, None] >= positions[:, None, None, :])
          & (segments[:, None, :, None] == segments[:, None, None, :]))

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  def ours(q, k, v):
    return masked_attention(q, k, v, mask, causal=True)  # the mask is causal: halves skipped

  def ours_whole(q, k, v):
    return masked_attention(q, k, v, mask)

  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-6)
  grads = [jax.grad(lambda *qkv, f=f: jnp.sum(f(*qkv) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (reference, ours, ours_whole)]
  for expected, got, got_whole in zip(*grads):
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got_whole, expected, atol=1e-5)

  # bf16 operands: values and gradients (bf16 products, float32 sums) near the float32 ones.
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  np.testing.assert_allclose(ours(*bf16).astype(jnp.float32), reference(q, k, v), atol=0.05)
  bf16_grads = jax.jit(jax.grad(lambda *qkv: jnp.sum(ours(*qkv).astype(jnp.float32) * weights),
                                argnums=(0, 1, 2)))(*bf16)
  for got, expected in zip(bf16_grads, grads[0]):
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=0.03 * scale)


@pytest.mark.parametrize('layout', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_bfloat16_compute_runs_the_backward_matmuls_in_bfloat16(layout):
  cfg, model, params = make(layout, compute_dtype='bfloat16')
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 61)

  def loss(p):
    logits, _ = model.apply({'params': p}, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  program = jax.jit(jax.grad(loss)).lower(params).as_text()
  products = re.findall(r'stablehlo\.dot_general .*?: \(tensor<(?:\d+x)*(\w+)>, '
                        r'tensor<(?:\d+x)*(\w+)>\) -> tensor<(?:\d+x)*(\w+)>', program)
  assert len(products) > 10 * cfg.num_layers
  # Every projection, attention's two products, the output head and all their gradients take
  # bf16 operands (attention's float32 logits included: their cotangent is cast to bf16) and
  # accumulate in float32 (XLA:CPU's fast bf16 products need that asked for).
  assert set(products) == {('bf16', 'bf16', 'f32')}, products


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  cfg, model, params = make(GPT2, compute_dtype='bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 61)
  logits, _ = model.apply({'params': params}, tokens)
  reference, _ = Transformer(dataclasses.replace(cfg, compute_dtype='float32')).apply(
      {'params': params}, tokens)
  assert logits.dtype == jnp.float32
  assert 0 < float(jnp.abs(logits - reference).max()) < 0.05  # bf16 inputs, float32 sums
  # The head's float32 sums are not rounded to bf16 on the way out.
  assert (logits != logits.astype(jnp.bfloat16).astype(jnp.float32)).mean() > 0.9
  # The float32 residual stream starts from the token embeddings as stored, not rounded to bf16.
  _, state = model.apply({'params': params}, tokens, capture_intermediates=True)
  (looked_up,) = state['intermediates']['wte']['__call__']
  np.testing.assert_array_equal(looked_up, params['wte']['embedding'][tokens])


def saved_residuals(model, params, tokens, reduce=jnp.sum) -> str:
  """What jax keeps for the backward pass of reduce(logits), as print_saved_residuals says."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(lambda p: reduce(model.apply({'params': p}, tokens)[0]),
                                        params)
  return out.getvalue()


def test_remat_projections_keeps_projections_but_not_attention_logits():
  """What each policy saves for the backward pass: 'projections' the [tokens, features]
  outputs of the projections (here [64, 64], fc_in's), never attention's [batch, heads, t, s]
  logits of the causal halves, which 'dots_saveable' keeps."""
  cfg = ModelConfig(vocab_size=64, max_len=32, num_layers=1, num_heads=2, emb_dim=32,
                    mlp_dim=64)
  tokens = jnp.zeros((2, 32), jnp.int32)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)['params'])

  def saved(policy):
    model = Transformer(dataclasses.replace(cfg, remat=policy))
    return set(re.findall(r'\w+\[[0-9,]*\]', saved_residuals(model, params, tokens)))

  logits = {'f32[2,2,16,16]', 'f32[2,2,16,32]'}
  assert logits <= saved('dots_saveable')
  assert not logits & saved('projections') and 'f32[64,64]' in saved('projections')


@pytest.mark.parametrize('layout', [GPT2, LLAMA], ids=['tied', 'untied'])
def test_loss_chunk_gives_the_losses_and_gradients_of_the_full_logits(layout):
  from gpt_jax import steps  # pylint: disable=import-outside-toplevel
  cfg, model, params = make(layout)
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, cfg.vocab_size)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}

  def loss_and_grads(chunk):
    chunked = Transformer(dataclasses.replace(cfg, loss_chunk=chunk))
    return jax.jit(jax.value_and_grad(lambda p: steps.loss_fn(chunked, p, batch, None)))(params)

  loss, grads = loss_and_grads(0)
  chunked_loss, chunked_grads = loss_and_grads(8)
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The chunks' logits are all the program holds: no [batch, length, vocab] array.
  hlo = jax.jit(jax.grad(lambda p: steps.loss_fn(
      Transformer(dataclasses.replace(cfg, loss_chunk=8)), p, batch, None))).lower(
          params).as_text()
  assert f'2x32x{cfg.vocab_size}x' not in hlo and f'2x8x{cfg.vocab_size}x' in hlo
  config = config_lib.base_config()
  config.model.loss_chunk = 24
  with pytest.raises(ConfigError, match='loss_chunk .24. must be 0 .off. or divide'):
    config_lib.validate(config)


def test_bfloat16_residual_stream_halves_what_full_remat_keeps():
  cfg, _, params = make(GPT2, remat='full', compute_dtype='bfloat16')
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

  def saved(residual_dtype):
    model = Transformer(dataclasses.replace(cfg, residual_dtype=residual_dtype))
    text = saved_residuals(model, params, tokens, jnp.mean)
    # The blocks' inputs (the residual stream), not the final norm's float32 internals.
    return set(re.findall(rf'(\w+)\[2,16,{cfg.emb_dim}\] output of add .*'
                          r'\((?:Block|Transformer)\.__call__\)', text))

  assert saved('float32') == {'f32'} and saved('bfloat16') == {'bf16'}
  bf16 = Transformer(dataclasses.replace(cfg, residual_dtype='bfloat16'))
  f32 = Transformer(cfg)
  np.testing.assert_allclose(bf16.apply({'params': params}, tokens)[0],
                             f32.apply({'params': params}, tokens)[0], atol=0.05)
