"""Causal (optionally packed-sequence) attention with the Pallas TPU splash-attention kernel.

`splash_attention(q, k, v, segment_ids)` computes the same thing as the model's
`masked_attention(q, k, v, mask, causal=True)` with mask = causal & same-segment: q
[batch, t, heads, head_dim], k and v [batch, t, kv_heads, head_dim], query head i reading kv
head i // (heads // kv_heads); the softmax scale head_dim ** -0.5 is applied to q before the
kernel (the kernel does not scale). Output [batch, t, heads, head_dim] in q's dtype.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention`, called as MaxText's
`AttentionOp.tpu_flash_attention` does: [heads, t, head_dim] per example (vmapped over the
batch), the MHA kernel handling grouped-query attention itself (it maps query head h to kv head
h // (heads // kv_heads) in its index maps), a `CausalMask` per head in a `MultiHeadMask`,
`SegmentIds(q, kv)` for packed sequences, and, with a mesh, a `jax.shard_map` with the batch over
('data', 'fsdp') and the (query and kv) heads over 'tensor'.

Unlike MaxText, the kernel object is built inside the shard_map body for the local head count
(head_shards=1, q_seq_shards=1): the causal mask is a computable mask, so its block metadata is a
few small int arrays that become constants of the traced program, and nothing about the kernel
needs to be passed through shard_map's in_specs.

interpret=True runs the kernel in Pallas' interpreter (any backend, e.g. CPU tests).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
HEAD_AXIS = 'tensor'


def _block_sizes(t: int, block_q: int, block_kv: int, block_kv_compute: int) -> sak.BlockSizes:
  bq, bkv, bkvc = min(block_q, t), min(block_kv, t), min(block_kv_compute, t)
  for name, b in (('block_q', bq), ('block_kv', bkv), ('block_kv_compute', bkvc)):
    if t % b:
      raise ValueError(f'splash_attention: {name}={b} must divide the sequence length {t}')
  if bkv % bkvc:
    raise ValueError(f'splash_attention: block_kv_compute={bkvc} must divide block_kv={bkv}')
  if bkvc % 128:
    raise ValueError(f'splash_attention: block_kv_compute={bkvc} must be a multiple of 128')
  # The backward (dq and dkv kernels, not fused: MaxText's default) uses the forward's sizes.
  return sak.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkvc,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkvc,
      block_q_dq=bq, block_kv_dq=bkv,
      use_fused_bwd_kernel=False)


def _local_attention(q, k, v, segment_ids, *, block_sizes, interpret):
  """q [b, heads, t, d], k/v [b, kv_heads, t, d] (already scaled), segment_ids [b, t] or None.

  Runs on whatever is local: the whole arrays, or one shard inside shard_map.
  """
  heads, t = q.shape[1], q.shape[2]
  mask = sam.MultiHeadMask(tuple(sam.CausalMask(shape=(t, t)) for _ in range(heads)))
  kernel = sak.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                               interpret=interpret)
  if segment_ids is None:
    return jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
  seg = sak.SegmentIds(q=segment_ids, kv=segment_ids)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None = None, *,
                     mesh: jax.sharding.Mesh | None = None,
                     block_q: int = 512, block_kv: int = 512, block_kv_compute: int = 512,
                     interpret: bool = False) -> jax.Array:
  """Causal attention of q [b, t, heads, d] over k, v [b, t, kv_heads, d]; see the module doc.

  segment_ids [b, t] (int): packed sequences, a token attends to the earlier tokens of its own
  segment only. mesh: a Mesh with axes among ('data', 'fsdp', 'tensor'); the kernel then runs
  per shard in a shard_map, batch split over 'data' and 'fsdp', heads over 'tensor'. The block
  sizes are capped at t and must divide it (block_kv_compute a multiple of 128).
  """
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  if k.shape != (b, t, kv_heads, d) or v.shape != k.shape:
    raise ValueError(f'splash_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected '
                     'k and v [batch, t, kv_heads, head_dim] matching q '
                     '[batch, t, heads, head_dim]')
  if heads % kv_heads:
    raise ValueError(f'splash_attention: kv_heads={kv_heads} must divide heads={heads}')
  block_sizes = _block_sizes(t, block_q, block_kv, block_kv_compute)
  dtype = q.dtype

  # The kernel takes [heads, t, d] per example and does not scale the logits.
  q = (q.astype(jnp.float32) * d ** -0.5).astype(dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  attend = functools.partial(_local_attention, block_sizes=block_sizes, interpret=interpret)

  if mesh is None:
    out = attend(q, k, v, segment_ids)
  else:
    names = set(mesh.axis_names)
    batch_axes = tuple(a for a in BATCH_AXES if a in names)
    head_axis = HEAD_AXIS if HEAD_AXIS in names else None
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    n_head = mesh.shape[head_axis] if head_axis else 1
    if b % n_batch:
      raise ValueError(f'splash_attention: batch {b} not divisible by the {n_batch} devices of '
                       f'mesh axes {batch_axes}')
    if heads % n_head:
      raise ValueError(f'splash_attention: heads={heads} not divisible by the mesh axis '
                       f'{head_axis!r} of size {n_head}')
    if kv_heads % n_head:
      # Repeat each kv head r times so that the kv heads split evenly over the head axis; query
      # head i still reads (a copy of) kv head i // (heads // kv_heads).
      r = n_head // math.gcd(kv_heads, n_head)
      k, v = jnp.repeat(k, r, axis=1), jnp.repeat(v, r, axis=1)
    batch_spec = batch_axes or None
    qkv_spec = P(batch_spec, head_axis, None, None)
    seg_spec = P(batch_spec, None)
    if segment_ids is None:
      fn = jax.shard_map(lambda q, k, v: attend(q, k, v, None), mesh=mesh,
                         in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
      out = fn(q, k, v)
    else:
      fn = jax.shard_map(attend, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)
      out = fn(q, k, v, segment_ids)
  return out.transpose(0, 2, 1, 3).astype(dtype)
