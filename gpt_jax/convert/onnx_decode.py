"""Prefill and one decoding step of a GPT-2-layout model as torch modules, for torch.onnx.

They run the layers of a Hugging Face `GPT2LMHeadModel` (the form gpt_jax.export builds from a
workdir) with the KV cache as fixed-shape inputs and outputs, as gpt_jax decodes
(gpt_jax/model.py): per layer k and v, each float32 [batch, heads, slots, head_dim], slot p
holding position p's key and value.

  prefill(tokens [B, L], lengths [B]) -> (logits [B, V] of each row's last prompt token,
      cache_0_k, cache_0_v, ...): the prompt's keys and values in slots 0..L-1 (slots from a
      row's length on hold padding, which decoding never reads and overwrites).
  decode_step(tokens [B], positions [B], cache...) -> (logits [B, V], cache...): each row's
      token at its position attends to the slots before it and to itself, and its key and
      value are written to that slot (a select over the slots: no scatter in the graph).

Token ids, lengths and positions are int64 (what ONNX gathers with).
"""

import torch


class _CachedGpt2(torch.nn.Module):
  """A GPT2LMHeadModel's layers, computed with an explicit KV cache of `slots` positions."""

  def __init__(self, hf_model, slots: int):
    super().__init__()
    self.transformer, self.lm_head = hf_model.transformer, hf_model.lm_head
    self.slots = slots
    self.emb_dim = hf_model.config.n_embd
    self.heads = hf_model.config.n_head
    self.head_dim = self.emb_dim // self.heads

  def _heads(self, x):
    """[B, T, E] -> [B, heads, T, head_dim]."""
    return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

  def _qkv(self, block, x):
    q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.emb_dim, dim=2)
    return self._heads(q), self._heads(k), self._heads(v)

  def _finish(self, block, x, y):
    """The block's residual stream after attention's output y [B, heads, T, head_dim]."""
    y = y.transpose(1, 2).reshape(x.shape)
    x = x + block.attn.c_proj(y)
    return x + block.mlp(block.ln_2(x))

  def _logits(self, x):
    return self.lm_head(self.transformer.ln_f(x))


class Prefill(_CachedGpt2):

  def forward(self, tokens, lengths):
    batch, length = tokens.shape
    positions = torch.arange(length, device=tokens.device)
    x = self.transformer.wte(tokens) + self.transformer.wpe(positions)[None]
    causal = positions[:, None] >= positions[None, :]
    lowest = torch.finfo(x.dtype).min
    padding = torch.zeros(batch, self.heads, self.slots - length, self.head_dim, dtype=x.dtype)
    cache = []
    for block in self.transformer.h:
      q, k, v = self._qkv(block, x)
      scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5
      probs = torch.softmax(torch.where(causal, scores, lowest), dim=-1)
      x = self._finish(block, x, torch.matmul(probs, v))
      cache += [torch.cat([k, padding], dim=2), torch.cat([v, padding], dim=2)]
    last = x[torch.arange(batch), lengths - 1]
    return (self._logits(last), *cache)


class DecodeStep(_CachedGpt2):

  def forward(self, tokens, positions, *cache):
    x = (self.transformer.wte(tokens) + self.transformer.wpe(positions))[:, None]
    slots = torch.arange(self.slots, device=tokens.device)
    earlier = (slots[None, :] < positions[:, None])[:, None, None, :]  # [B, 1, 1, slots]
    written = (slots[None, :] == positions[:, None])[:, None, :, None]  # [B, 1, slots, 1]
    lowest = torch.finfo(x.dtype).min
    scale = self.head_dim ** -0.5
    new_cache = []
    for i, block in enumerate(self.transformer.h):
      cache_k, cache_v = cache[2 * i], cache[2 * i + 1]
      q, k, v = self._qkv(block, x)
      old = torch.where(earlier, torch.matmul(q, cache_k.transpose(2, 3)) * scale, lowest)
      own = (q * k).sum(dim=-1, keepdim=True) * scale
      probs = torch.softmax(torch.cat([old, own], dim=-1), dim=-1)
      y = torch.matmul(probs[..., :self.slots], cache_v) + probs[..., self.slots:] * v
      x = self._finish(block, x, y)
      new_cache += [torch.where(written, k, cache_k), torch.where(written, v, cache_v)]
    return (self._logits(x[:, 0]), *new_cache)
