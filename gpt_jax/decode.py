"""Autoregressive generation with a KV cache: one jitted prefill, then one jitted step per token.

Prompts of different lengths share a batch: each row keeps its own position, and row b's token
at position p always lives in cache slot p, so padding never leaks into attention.
"""

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, init_cache


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
  """Next tokens from logits [batch, vocab]; temperature 0 means greedy (argmax)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k > 0:
    kth_largest = jnp.sort(logits, axis=-1)[:, -top_k][:, None]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest set of tokens whose probability reaches top_p (always the first one).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Prompt tokens; an empty prompt starts from end-of-text (or a newline for char vocabularies)."""
  if text:
    return tokenizer.encode(text)
  if tokenizer.eos_id is not None:
    return [tokenizer.eos_id]
  return tokenizer.encode('\n')


class Generator:
  """Jitted prefill and decode step for one model; reused across calls without recompiling."""

  def __init__(self, cfg: ModelConfig, params):
    self.cfg, self.params = cfg, params
    self.model = Transformer(cfg)

  @functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(3,))
  def _prefill(self, params, tokens, cache, lengths, temperature, top_k, top_p, rng):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, cache = self.model.apply({'params': params}, tokens, positions, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample_logits(last, rng, temperature, top_k, top_p), cache

  @functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(4,))
  def _step(self, params, tokens, positions, cache, temperature, top_k, top_p, rng):
    logits, cache = self.model.apply({'params': params}, tokens[:, None], positions[:, None], cache)
    return sample_logits(logits[:, 0], rng, temperature, top_k, top_p), cache

  def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [batch], max_new_tokens times."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ConfigError('Every prompt needs at least one token')
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.max() + max_new_tokens > self.cfg.max_len:
      raise ConfigError(
          f'Prompt of {lengths.max()} tokens + max_new_tokens={max_new_tokens} exceeds the '
          f"model's context of {self.cfg.max_len} tokens")
    padded_len = min(self.cfg.max_len, -(-int(lengths.max()) // 16) * 16)  # fewer compilations
    tokens = np.zeros((len(prompts), padded_len), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    rng = jax.random.key(seed)
    sampling = (float(temperature), int(top_k), float(top_p))
    cache = init_cache(self.cfg, len(prompts))
    next_tokens, cache = self._prefill(self.params, tokens, cache, jnp.asarray(lengths),
                                       *sampling, jax.random.fold_in(rng, 0))
    positions = jnp.asarray(lengths)
    for i in range(max_new_tokens):
      yield np.asarray(next_tokens)
      if i + 1 < max_new_tokens:
        next_tokens, cache = self._step(self.params, next_tokens, positions, cache, *sampling,
                                        jax.random.fold_in(rng, i + 1))
        positions = positions + 1

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               eos_id: int | None = None, **sampling) -> list[list[int]]:
    """New tokens for each prompt, cut after the first eos_id."""
    outputs = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    for step_tokens in self.stream(prompts, max_new_tokens, **sampling):
      for row, token in enumerate(step_tokens):
        if not finished[row]:
          outputs[row].append(int(token))
          finished[row] = eos_id is not None and token == eos_id
      if finished.all():
        break
    return outputs
