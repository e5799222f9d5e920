"""Attention implementations (gpt_jax/kernels): splash attention in Pallas' interpreter on this
CPU against plain float32 attention (outputs and gradients; MHA and grouped-query, packed
segments, float32 and bfloat16, the shard_map path on 4 host devices); compiled for TPU; the
model's choice by config and platform; cuDNN's call checked through its XLA twin.

  python -m pytest -q tests/test_attention.py -s     # -s prints the observed errors
"""

import json
import os
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # also when run as the sharded subprocess

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import kernels
from gpt_jax.errors import ConfigError
from gpt_jax.kernels.splash_attention import splash_attention
from gpt_jax.model import ModelConfig, Transformer, masked_attention

# Observed (CPU, interpret mode) maxima of |splash - reference| / max|reference|, per tensor
# (out, dq, dk, dv): float32 <= 1.7e-6, bfloat16 <= 6.7e-3 (bf16 inputs, the scaled q rounded
# to bf16, bf16 outputs and gradients).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def reference_attention(q, k, v, segment_ids=None):
  """softmax(q k^T * d**-0.5 + causal/segment mask) v, all in float32; [b, t, h, d] layout."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  b, t, heads, d = q.shape
  groups = heads // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k, precision='highest') * d ** -0.5
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v, precision='highest')


def make_inputs(b, t, heads, kv_heads, d, dtype, segments, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, heads, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, kv_heads, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kv_heads, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(ks[3], (b, t, heads, d), jnp.float32)
  seg = None
  if segments:  # two packed segments per row, boundaries not on block edges
    splits = [3 * t // 8 + 5 * i for i in range(b)]
    seg = jnp.asarray([[0 if j < s else 1 for j in range(t)] for s in splits], jnp.int32)
  return q, k, v, cot, seg


def value_and_grads(attn, q, k, v, cot, seg):
  def loss(q, k, v):
    out = attn(q, k, v, seg)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


CASES = [  # (t, heads, kv_heads, segments, block)
    (256, 4, 4, False, 512),
    (256, 4, 2, True, 128),
    (512, 4, 2, True, 512),
    (512, 4, 4, False, 128),
]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('t,heads,kv_heads,segments,block', CASES,
                         ids=[f't{c[0]}-h{c[1]}kv{c[2]}-{"seg" if c[3] else "noseg"}-b{c[4]}'
                              for c in CASES])
def test_matches_reference(t, heads, kv_heads, segments, block, dtype):
  q, k, v, cot, seg = make_inputs(2, t, heads, kv_heads, 64, dtype, segments)
  blocks = dict(block_q=block, block_kv=block, block_kv_compute=block)
  out, grads = value_and_grads(
      lambda q, k, v, s: splash_attention(q, k, v, s, interpret=True, **blocks), q, k, v, cot, seg)
  ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, cot, seg)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
  errs = {name: rel_err(a, b) for name, a, b in
          zip(('out', 'dq', 'dk', 'dv'), (out, *grads), (ref_out, *ref_grads))}
  print(f'\n{jnp.dtype(dtype).name} t={t} h={heads} kv={kv_heads} seg={segments} block={block}: '
        + ' '.join(f'{n}={e:.2e}' for n, e in errs.items()))
  tol = TOL[dtype]
  assert all(e < tol for e in errs.values()), (errs, tol)


def test_rejects_bad_shapes():
  q = jnp.zeros((1, 256, 4, 64))
  with pytest.raises(ValueError, match='must divide'):
    splash_attention(q, jnp.zeros((1, 256, 3, 64)), jnp.zeros((1, 256, 3, 64)), interpret=True)
  q384 = jnp.zeros((1, 384, 4, 64))
  with pytest.raises(ValueError, match='block_q=256 must divide'):
    splash_attention(q384, q384, q384, block_q=256, interpret=True)
  with pytest.raises(ValueError, match='multiple of 128'):
    splash_attention(q, q, q, block_kv=128, block_kv_compute=64, interpret=True)


def test_compiles_for_tpu():
  """The real (Mosaic) kernels, forward and backward, sharded, compile for 4 v5p chips."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  pytest.importorskip('libtpu', reason='libtpu is not installed: pip install -e ".[tpu]"')
  from gpt_jax.tpu import topology as tpu
  devices = tpu.Slice.parse('v5p-8').devices()
  mesh = jax.make_mesh((1, 2, 2), ('data', 'fsdp', 'tensor'), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  act = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
  q = jax.ShapeDtypeStruct((4, 1024, 4, 128), jnp.bfloat16, sharding=act)
  kv = jax.ShapeDtypeStruct((4, 1024, 2, 128), jnp.bfloat16, sharding=act)
  seg = jax.ShapeDtypeStruct((4, 1024), jnp.int32,
                             sharding=NamedSharding(mesh, P(('data', 'fsdp'), None)))

  def loss(q, k, v, s):
    return jnp.sum(splash_attention(q, k, v, s, mesh=mesh).astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
  assert compiled.as_text().count('tpu_custom_call') >= 3  # forward, dq and dkv kernels


# --- shard_map path: 4 host devices, in a subprocess (the device count is fixed at startup) ---

def _sharded_main():
  from jax.sharding import NamedSharding, PartitionSpec as P
  assert jax.device_count() == 4, jax.devices()
  results = {}
  for mesh_shape, heads, kv_heads, segments in (((1, 2, 2), 4, 4, False),
                                                ((1, 2, 2), 4, 2, True),
                                                ((2, 1, 2), 4, 2, False),
                                                ((1, 2, 2), 4, 1, True),   # kv heads repeated x2
                                                ((1, 1, 4), 8, 2, True)):  # kv heads repeated x2
    mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp', 'tensor'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v, cot, seg = make_inputs(2, 256, heads, kv_heads, 64, jnp.float32, segments, seed=1)
    act = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
    kv_spec = (act if kv_heads % mesh.shape['tensor'] == 0
               else NamedSharding(mesh, P(('data', 'fsdp'))))
    q, cot = jax.device_put(q, act), jax.device_put(cot, act)
    k, v = jax.device_put(k, kv_spec), jax.device_put(v, kv_spec)
    attn = lambda m: (lambda q, k, v, s: splash_attention(q, k, v, s, mesh=m, block_q=128,
                                                          block_kv=128, block_kv_compute=128,
                                                          interpret=True))
    out_m, grads_m = value_and_grads(attn(mesh), q, k, v, cot, seg)
    out_1, grads_1 = value_and_grads(attn(None), q, k, v, cot, seg)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, cot, seg)
    key = f'mesh{mesh_shape}-h{heads}kv{kv_heads}{"-seg" if segments else ""}'
    results[key] = {
        'vs_unsharded': max(float(jnp.abs(a - b).max())
                            for a, b in zip((out_m, *grads_m), (out_1, *grads_1))),
        'vs_reference': max(rel_err(a, b) for a, b in zip((out_m, *grads_m),
                                                           (ref_out, *ref_grads))),
        'out_sharding': str(out_m.sharding.spec),
    }
  print(json.dumps(results))


def test_shard_map_matches_unsharded():
  here = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([here, os.path.dirname(here),
                                        os.environ.get('PYTHONPATH', '')])}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'sharded'], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  print('\n' + json.dumps(results, indent=1))
  for key, r in results.items():
    assert r['vs_unsharded'] < 1e-5, (key, r)
    assert r['vs_reference'] < TOL[jnp.float32], (key, r)


def test_the_model_runs_each_implementation_the_config_names():
  """splash (interpreted here) and xla give the model the same logits and gradients, packed
  segments and grouped-query attention included; `auto` is xla on CPU."""
  cfg = ModelConfig(vocab_size=128, max_len=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    emb_dim=128, mlp_dim=256, position='rope', norm='rmsnorm', mlp='swiglu',
                    use_bias=False, tie_embeddings=False, splash_block_q=128,
                    splash_block_kv=128, splash_block_kv_compute=128)
  tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 128)
  segments = jnp.concatenate([jnp.zeros((2, 100), jnp.int32), jnp.ones((2, 156), jnp.int32)], 1)
  positions = jnp.concatenate([jnp.arange(100), jnp.arange(156)])[None].repeat(2, 0)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)['params'])

  def run(attention):
    model = Transformer(dataclasses.replace(cfg, attention=attention))
    def loss(p):
      logits, _ = model.apply({'params': p}, tokens, positions=positions, segment_ids=segments)
      return jnp.mean(logits ** 2), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, xla_logits), xla_grads = run('xla')
  (_, splash_logits), splash_grads = run('splash')
  np.testing.assert_allclose(splash_logits, xla_logits, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)
  (_, auto_logits), _ = run('auto')
  np.testing.assert_array_equal(auto_logits, xla_logits)


def test_implementations_are_checked_against_the_platform():
  assert [kernels.attention_for('auto', p) for p in ('cpu', 'gpu', 'tpu')] == [
      'xla', 'cudnn', 'splash']
  kernels.check_attention('splash', 'tpu')
  kernels.check_attention('auto', 'cpu')
  with pytest.raises(ConfigError, match="attention='splash' runs on TPU devices only"):
    kernels.check_attention('splash', 'cpu')
  with pytest.raises(ConfigError, match="attention='cudnn' runs on GPU devices only"):
    kernels.check_attention('cudnn', 'tpu')


def test_cudnn_call_with_xla_equals_ours():
  """The call the cudnn implementation makes, with implementation='xla' (no GPU here), gives
  the model's attention, causal and with packed segments."""
  q, k, v, _, seg = make_inputs(2, 64, 4, 2, 16, jnp.float32, True)
  t = q.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  for segment_ids in (None, seg):
    mask = causal if segment_ids is None else causal & (
        segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    ours = masked_attention(q, k, v, jnp.broadcast_to(mask, (2, 1, t, t)), causal=True)
    theirs = (jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
              if segment_ids is None else
              jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla'))
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


if __name__ == '__main__' and sys.argv[1:] == ['sharded']:
  _sharded_main()
