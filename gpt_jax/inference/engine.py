"""Continuous batching over a fixed set of slots: the decoding engine behind gpt_jax.serve.

The engine owns a KV cache of `slots` rows, each as long as the model's context. A sequence (one
choice of one request) takes a free slot: its prompt but the last token is prefilled into that
slot's cache rows (one jitted program per prompt bucket: powers of two from 16, capped at the
context), then one jitted step advances every slot by one token: the last prompt token first,
then each sampled token in turn. A finished sequence frees its slot at once and a waiting one
takes it at the next step, so requests join and leave the batch between steps.

What compiles: one step program (for all slots) and one prefill program per prompt bucket;
nothing else, whatever the traffic. Sampling settings are per-slot arrays (temperature, where 0
is greedy; top_p; seed; choice index; step), so slots with different settings share the step.

A sequence's tokens do not depend on the other slots: every row of the step computes on its own
cache rows only, and sampling draws step t of choice r with the key
fold_in(fold_in(key(seed), r), t), as gpt_jax.decode does.

Sequences are submitted from any thread; the engine runs its loop in its own thread and calls
each sequence's `on_token(token)` and `on_finish(reason, error)` from there.
"""

import collections
import contextlib
import dataclasses
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import backends, decode, sharding
from gpt_jax.inference import quantize
from gpt_jax.model import CACHE_AXES, ModelConfig, Transformer, init_cache


@dataclasses.dataclass(eq=False)
class Sequence:
  """One choice to generate. on_token returns True to stop (e.g. a stop string was reached)."""
  prompt: list[int]
  max_new: int
  on_token: Callable[[int], bool]
  on_finish: Callable[[str, str | None], None]  # (reason: 'stop' | 'length' | 'cancelled' |
                                                #  'error', error message or None)
  end_ids: frozenset = frozenset()  # tokens that end the sequence (and are passed to on_token)
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  row: int = 0                      # the choice's index within its request, for the sampling key
  generated: int = 0
  cancelled: bool = False

  def cancel(self) -> None:
    """Stop generating; the engine frees the slot at its next step."""
    self.cancelled = True


class Engine:
  """Fixed-slot continuous batching for one model (float or `quantize.apply`'s int8)."""

  def __init__(self, cfg: ModelConfig, params, slots: int = 8, num_tokens: int | None = None,
               placement: sharding.Placement | None = None):
    """num_tokens: the tokenizer's vocabulary size; ids past it are never drawn. placement: the
    mesh and rules of sharded `params` (the slots are rounded up to its batch shards)."""
    if slots < 1:
      raise ValueError(f'slots must be >= 1, got {slots}')
    # As decode.Generator: output-major kernels on one CPU device.
    self.output_major = backends.output_major_decoding(
        placement.num_devices if placement else 1)
    if self.output_major:
      params = backends.to_output_major(params)
    if placement:
      slots = placement.rows(slots)
    self.cfg, self.params, self.slots, self.num_tokens = cfg, params, slots, num_tokens
    self.placement = placement
    self.context = cfg.max_len
    self._model = Transformer(cfg)
    if placement:
      with placement.activate():
        self._cache = jax.jit(lambda: init_cache(cfg, slots),
                              out_shardings=placement.sharding(*CACHE_AXES))()
    else:
      self._cache = init_cache(cfg, slots)
    options = backends.cache_compiler_options()
    self._step_fn = jax.jit(self._step_impl, donate_argnums=(1,), compiler_options=options)
    self._prefill_fn = jax.jit(self._prefill_impl, donate_argnums=(1,), compiler_options=options)
    # Host copies of the per-slot state.
    self._seqs: list[Sequence | None] = [None] * slots
    self._tokens = np.zeros(slots, np.int32)
    self._positions = np.zeros(slots, np.int32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_p = np.ones(slots, np.float32)
    self._seed = np.zeros(slots, np.int32)
    self._row = np.zeros(slots, np.int32)
    self._pending: collections.deque[Sequence] = collections.deque()
    self._lock = threading.Condition()
    self._stopped = False
    self._thread: threading.Thread | None = None
    self.steps = 0  # step programs run (for tests and benchmarks)

  # ---------------------------------------------------------------- device programs

  def _on_devices(self, one_row: bool = False):
    """The context programs are traced and run in: the placement's mesh and rules (a prefill's
    single row is not split over the batch shards)."""
    if not self.placement:
      return contextlib.nullcontext()
    return (self.placement.unsplit_batch() if one_row else self.placement).activate()

  def _apply(self, params, tokens, positions, cache):
    with backends.output_major_projections(self.output_major):
      return quantize.apply_model(self._model, params, tokens, positions, cache)

  def _prefill_impl(self, params, cache, slot, tokens):
    """Writes the keys and values of tokens [1, width] into slot `slot`'s cache rows 0..width-1."""
    width = tokens.shape[1]
    one = init_cache(dataclasses.replace(self.cfg, max_len=width), 1)
    _, one = self._apply(params, tokens, jnp.arange(width)[None], one)
    return [{name: jax.lax.dynamic_update_slice(layer[name], new[name].astype(layer[name].dtype),
                                                (slot, 0, 0, 0)) for name in layer}
            for layer, new in zip(cache, one)]

  def _step_impl(self, params, cache, tokens, positions, steps, seeds, rows, temperature, top_p):
    """Feeds tokens [slots] at positions [slots]; returns the next token of every slot."""
    logits, cache = self._apply(params, tokens[:, None], positions[:, None], cache)
    logits = decode.restrict_vocab(logits[:, 0], self.num_tokens)
    greedy = decode.greedy_tokens(logits)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = jnp.where((top_p < 1.0)[:, None],
                         decode.filter_logits(scaled, 0, top_p[:, None]), scaled)
    keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r),
                                                       t))(seeds, rows, steps)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32), cache

  def compile(self) -> None:
    """Compiles the step and every prefill bucket now, rather than at the first requests."""
    with self._lock:
      width = 16
      while True:
        width = decode.length_bucket(width, self.context)
        with self._on_devices(one_row=True):
          self._cache = self._prefill_fn(self.params, self._cache, np.int32(0),
                                         np.zeros((1, width), np.int32))
        if width >= self.context:
          break
        width *= 2
      self._run_step()

  # ---------------------------------------------------------------- host side

  def start(self) -> 'Engine':
    self._thread = threading.Thread(target=self._loop, name='engine', daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._lock:
      self._stopped = True
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join()

  def submit(self, seq: Sequence) -> Sequence:
    if not seq.prompt:
      raise ValueError('A prompt needs at least one token')
    if len(seq.prompt) + seq.max_new > self.context or seq.max_new < 1:
      raise ValueError(f'Prompt of {len(seq.prompt)} tokens + {seq.max_new} new tokens does not '
                       f'fit the context of {self.context}')
    with self._lock:
      self._pending.append(seq)
      self._lock.notify_all()
    return seq

  @property
  def busy_slots(self) -> int:
    return sum(s is not None for s in self._seqs)

  @property
  def waiting(self) -> int:
    """Sequences waiting for a slot (cancelled ones no longer count)."""
    with self._lock:  # the engine thread changes the queue
      return sum(not seq.cancelled for seq in self._pending)

  def _admit(self, slot: int, seq: Sequence) -> None:
    prompt = seq.prompt
    if len(prompt) > 1:
      width = decode.length_bucket(len(prompt) - 1, self.context)
      tokens = np.zeros((1, width), np.int32)
      tokens[0, :len(prompt) - 1] = prompt[:-1]
      with self._on_devices(one_row=True):
        self._cache = self._prefill_fn(self.params, self._cache, np.int32(slot), tokens)
    self._seqs[slot] = seq
    self._tokens[slot] = prompt[-1]
    self._positions[slot] = len(prompt) - 1
    self._temperature[slot] = seq.temperature
    self._top_p[slot] = seq.top_p
    self._seed[slot] = np.int32(seq.seed % (1 << 31))
    self._row[slot] = seq.row

  def _run_step(self) -> np.ndarray:
    steps = np.array([s.generated if s else 0 for s in self._seqs], np.int32)
    with self._on_devices():
      next_tokens, self._cache = self._step_fn(
          self.params, self._cache, self._tokens, self._positions, steps, self._seed, self._row,
          self._temperature, self._top_p)
    self.steps += 1
    return np.asarray(next_tokens)

  def _free(self, slot: int, reason: str, error: str | None = None) -> None:
    seq, self._seqs[slot] = self._seqs[slot], None
    self._positions[slot] = 0
    self._temperature[slot] = 0
    seq.on_finish(reason, error)

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._stopped and not self._pending and self.busy_slots == 0:
          self._lock.wait()
        if self._stopped:
          break
        cancelled = [seq for seq in self._pending if seq.cancelled]
        if cancelled:  # a request that gave up while waiting leaves the queue now
          self._pending = collections.deque(seq for seq in self._pending if not seq.cancelled)
          for seq in cancelled:
            seq.on_finish('cancelled', None)
        admit = []
        for slot in range(self.slots):
          while self._seqs[slot] is None and self._pending:
            seq = self._pending.popleft()
            if seq.cancelled:
              seq.on_finish('cancelled', None)
              continue
            admit.append((slot, seq))
            self._seqs[slot] = seq  # reserved
      try:
        for slot, seq in admit:
          self._admit(slot, seq)
        next_tokens = self._run_step()
      except Exception as e:  # pylint: disable=broad-except
        for slot in range(self.slots):  # a device error ends the running sequences, not the server
          if self._seqs[slot] is not None:
            self._free(slot, 'error', f'{type(e).__name__}: {e}')
        continue
      for slot, seq in enumerate(self._seqs):
        if seq is None:
          continue
        if seq.cancelled:
          self._free(slot, 'cancelled')
          continue
        token = int(next_tokens[slot])
        seq.generated += 1
        try:
          stop = seq.on_token(token)
        except Exception as e:  # pylint: disable=broad-except
          self._free(slot, 'error', f'{type(e).__name__}: {e}')
          continue
        if stop or token in seq.end_ids:
          self._free(slot, 'stop')
        elif seq.generated >= seq.max_new:
          self._free(slot, 'length')
        else:
          self._tokens[slot] = token
          self._positions[slot] += 1
    with self._lock:
      for slot in range(self.slots):
        if self._seqs[slot] is not None:
          self._free(slot, 'cancelled')
      while self._pending:
        self._pending.popleft().on_finish('cancelled', None)
