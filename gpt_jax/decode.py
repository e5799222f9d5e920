"""Autoregressive generation with a KV cache, for batches of prompts of different lengths.

Row b's token at position p always lives in cache slot p, and each row keeps its own position,
so prompts of different lengths share a batch and padding never leaks into attention.

Two paths, one sampling rule (so the same seed gives the same tokens on both):
- `Generator.generate`: prefill and the whole decode loop in one jitted call (`while_loop`s
  that end when every row is done, one per cache window: see cache_windows): no per-token
  dispatch. Used by train's final sample, eval and the benchmark in experiments/bench_decode/.
- `Generator.stream`: one jitted prefill, then one jitted step per token, each step dispatched
  before the previous token is read back, so the host work overlaps the device's. Its cache is
  the whole bucket from the start, so that no new window compiles in the middle of a reply.
`stream_text` / `generate_text` add text on top: stop strings, and whole characters only when a
multi-byte character spans tokens.

Sampling, in Hugging Face's order: repetition penalty, temperature, top-k, top-p; temperature 0
is greedy. Row r = prompt i's sample j (r = i * num_samples + j) draws step t's token with the
key fold_in(fold_in(key(seed), r), t): deterministic given the seed.

What compiles: one program per (rows, prompt bucket, cache bucket, top_k, and whether decoding
is greedy, uses top-p, uses a repetition penalty). Buckets are powers of two from 16, capped at
the model's context: the prompt bucket covers the longest prompt, the cache bucket the longest
prompt + max_new_tokens (the KV cache is only that long, so attention never reads the full
context when the request is short). Prompt lengths within a bucket, prompt contents,
max_new_tokens within a bucket, temperature, top_p, repetition_penalty, eos_id and the seed
are traced values: changing them reuses the program.
"""

import contextlib
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import backends, sharding
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, init_cache, unstack_layers

PAD = -1  # what a row that has finished yields


def filter_logits(logits, top_k: int, top_p):
  """Logits outside the top-k / nucleus set to -inf. top_p: a (traced) float, or None: off."""
  if top_k > 0:
    kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest set of tokens whose probability reaches top_p (always the first one).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def restrict_vocab(logits, num_tokens: int | None):
  """Logits of ids past the tokenizer's vocabulary set to -inf.

  Embedding tables are often padded past the vocabulary (GPT-2: 50,257 tokens in 50,304 rows;
  fine-tuning grows them to a multiple of 64): those ids are no text, and rows that training
  never pushed down (a grown table under LoRA) can draw real probability when sampling.
  """
  if num_tokens is None or num_tokens >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)


def greedy_tokens(logits, chunk: int = 128):
  """argmax of logits [batch, vocab] over the vocabulary (the first of equal maxima), in two
  levels: the best chunk of `chunk` ids, then the best id in it. XLA:CPU runs a one-level argmax
  over GPT-2's vocabulary on one thread in about 0.95 ms at 8 rows; in two levels 0.09 ms for
  50,304 ids and 0.2 ms for 50,257 (experiments/bench_decode/README.md).

  When `chunk` does not divide the vocabulary, the ids past the last whole chunk form a shorter
  chunk of their own, and the second level reads `chunk` ids from the best chunk's start, moved
  back to fit when it is the last: the ids it then reads from the chunk before are below the
  best (an equal maximum there would have made their chunk the best).
  """
  batch, vocab = logits.shape
  if vocab <= chunk:
    return jnp.argmax(logits, axis=-1)
  whole = vocab // chunk * chunk
  chunk_max = logits[:, :whole].reshape(batch, -1, chunk).max(axis=-1)
  if whole < vocab:
    chunk_max = jnp.concatenate([chunk_max, logits[:, whole:].max(axis=-1, keepdims=True)], 1)
  best_chunk = jnp.argmax(chunk_max, axis=-1)
  start = jnp.minimum(best_chunk * chunk, vocab - chunk)
  within = jnp.take_along_axis(logits, start[:, None] + jnp.arange(chunk), axis=1)
  return start + jnp.argmax(within, axis=-1)


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
  """Next tokens from logits [batch, vocab]; temperature 0 means greedy (argmax)."""
  if temperature == 0:
    return greedy_tokens(logits)
  logits = filter_logits(logits / temperature, top_k, top_p if top_p < 1.0 else None)
  return jax.random.categorical(rng, logits, axis=-1)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Prompt tokens; an empty prompt starts from end-of-text (or a newline for char vocabularies)."""
  if text:
    return tokenizer.encode(text)
  if tokenizer.eos_id is not None:
    return [tokenizer.eos_id]
  return tokenizer.encode('\n')


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0) -> None:
  """ConfigError naming the first sampling setting out of range."""
  if not temperature >= 0:
    raise ConfigError(f'temperature must be >= 0 (0: greedy), got {temperature}')
  if top_k < 0:
    raise ConfigError(f'top_k must be >= 0 (0: off), got {top_k}')
  if not 0 < top_p <= 1:
    raise ConfigError(f'top_p must be in (0, 1] (1: off), got {top_p}')
  if not repetition_penalty > 0:
    raise ConfigError(f'repetition_penalty must be > 0 (1: off), got {repetition_penalty}')


@dataclasses.dataclass(frozen=True)
class _Mode:
  """The static part of the sampling settings: changing it compiles a new program."""
  greedy: bool
  top_k: int
  top_p: bool
  penalty: bool


@dataclasses.dataclass
class _Request:
  tokens: np.ndarray    # [rows, prompt bucket] int32, right-padded
  lengths: np.ndarray   # [rows] prompt lengths
  max_new: np.ndarray   # [rows] tokens to generate
  cache_len: int
  mode: _Mode
  dynamic: tuple        # eos_id, seed, temperature, top_p, repetition_penalty
  rows: int             # the caller's rows (the rest pad the batch to the mesh)


def length_bucket(n: int, cap: int) -> int:
  return min(cap, max(16, 1 << (max(n, 1) - 1).bit_length()))


# The smallest cache the decoding loop attends over (see cache_windows).
MIN_WINDOW = 64


def cache_windows(prompt_bucket: int, cache_len: int) -> list[int]:
  """The cache lengths `Generator.generate`'s loop runs through, doubling up to cache_len.

  Attention reads every slot of the cache it is given, filled or not. A loop over one cache of
  cache_len slots read all of them at every token; in phases whose cache doubles when the
  tokens outgrow it, a step reads at most twice the filled slots (GPT-2 124M, 8 rows, 16 + 128
  tokens: 120 slots on average instead of 256). Each phase compiles its own copy of the step.
  """
  windows = [min(max(prompt_bucket, MIN_WINDOW), cache_len)]
  while windows[-1] < cache_len:
    windows.append(min(2 * windows[-1], cache_len))
  return windows


def _grow_cache(cache, slots: int):
  """The cache with empty slots appended up to `slots` (unchanged if it has that many)."""
  def grow(x):
    return jnp.pad(x, [(0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0)])
  return jax.tree.map(grow, cache)


class Generator:
  """Jitted prefill, step and whole-loop programs for one model; reused across calls."""

  def __init__(self, cfg: ModelConfig, params, num_tokens: int | None = None,
               output_major: bool | None = None, placement: sharding.Placement | None = None):
    """num_tokens: the tokenizer's vocabulary size; ids past it are never drawn.

    output_major: hold the projection kernels [out, in] (backends.output_major_decoding); None:
    as the backend decides. `params` come in the trained layout; `self.params` are in the layout
    held. placement: the mesh and rules of sharded `params` (checkpoint.load_model's); the
    programs run on its devices, the batch padded to a multiple of its batch shards.
    """
    cfg, params = unstack_layers(cfg, params)  # decoding runs the blocks one by one
    if output_major is None:
      output_major = backends.output_major_decoding(placement.num_devices if placement else 1)
    self.output_major = output_major
    if self.output_major:
      params = backends.to_output_major(params)
    self.cfg, self.params, self.num_tokens = cfg, params, num_tokens
    self.placement = placement
    self.model = Transformer(cfg)
    options = backends.cache_compiler_options()
    self._prefill = jax.jit(self._prefill_impl, static_argnames=('mode', 'cache_len'),
                            compiler_options=options)
    self._step = jax.jit(self._step_impl, static_argnames=('mode',),
                         donate_argnames=('cache', 'seen'), compiler_options=options)
    self._generate = jax.jit(self._generate_impl, static_argnames=('mode', 'cache_len'),
                             compiler_options=options)

  # ---------------------------------------------------------------- device programs

  def _on_devices(self):
    """The context the programs are traced and run in: the placement's mesh and rules."""
    return self.placement.activate() if self.placement else contextlib.nullcontext()

  def _apply(self, params, tokens, positions, cache, logits_at=None):
    with backends.output_major_projections(self.output_major):
      return self.model.apply({'params': params}, tokens, positions, cache, logits_at=logits_at)

  def _next_tokens(self, logits, seen, seed, rows, step, dynamic, mode: _Mode):
    """Sampled tokens [rows] from logits [rows, vocab] (repetition penalty applied first)."""
    _, _, temperature, top_p, penalty = dynamic
    logits = restrict_vocab(logits, self.num_tokens)
    if mode.penalty:
      penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
      logits = jnp.where(seen, penalized, logits)
    if mode.greedy:
      return greedy_tokens(logits).astype(jnp.int32)
    logits = filter_logits(logits / temperature, mode.top_k, top_p if mode.top_p else None)
    base = jax.random.key(seed)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

  @staticmethod
  def _mark(seen, tokens, mode: _Mode):
    """seen[row, token] = True (tokens out of range, e.g. PAD, are dropped)."""
    if not mode.penalty:
      return seen
    tokens = jnp.where(tokens < 0, seen.shape[1], tokens)
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, tokens.reshape(seen.shape[0], -1)].set(True, mode='drop')

  def _prefill_impl(self, params, tokens, lengths, dynamic, *, mode: _Mode, cache_len: int):
    rows, width = tokens.shape
    cache = init_cache(dataclasses.replace(self.cfg, max_len=cache_len), rows)
    positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
    logits, cache = self._apply(params, tokens, positions, cache, logits_at=(lengths - 1)[:, None])
    last = logits[:, 0]
    seen = jnp.zeros((rows, logits.shape[-1] if mode.penalty else 0), bool)
    seen = self._mark(seen, jnp.where(positions < lengths[:, None], tokens, PAD), mode)
    first = self._next_tokens(last, seen, dynamic[1], jnp.arange(rows), 0, dynamic, mode)
    return first, cache, self._mark(seen, first, mode)

  def _step_impl(self, params, tokens, positions, cache, seen, step, dynamic, *, mode: _Mode):
    logits, cache = self._apply(params, tokens[:, None], positions[:, None], cache)
    rows = jnp.arange(tokens.shape[0])
    next_tokens = self._next_tokens(logits[:, 0], seen, dynamic[1], rows, step, dynamic, mode)
    return next_tokens, cache, self._mark(seen, next_tokens, mode)

  def _generate_impl(self, params, tokens, lengths, max_new, dynamic, *, mode: _Mode,
                     cache_len: int):
    eos_id = dynamic[0]
    windows = cache_windows(tokens.shape[1], cache_len)
    first, cache, seen = self._prefill_impl(params, tokens, lengths, dynamic, mode=mode,
                                            cache_len=windows[0])
    out = jnp.full((tokens.shape[0], cache_len), PAD, jnp.int32).at[:, 0].set(first)
    done = (first == eos_id) | (max_new <= 1)

    def cond(carry):
      step, *_, done = carry
      return (step < jnp.max(max_new)) & ~jnp.all(done)

    def body(carry):
      step, out, last, positions, cache, seen, done = carry
      new, cache, seen = self._step_impl(params, last, positions, cache, seen, step, dynamic,
                                         mode=mode)
      new = jnp.where(done, PAD, new)
      out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
      done = done | (new == eos_id) | (step + 1 >= max_new)
      positions = jnp.minimum(positions + 1, cache_len - 1)
      return step + 1, out, jnp.maximum(new, 0), positions, cache, seen, done

    carry = (jnp.int32(1), out, first, lengths, cache, seen, done)
    for window in windows:
      step, out, last, positions, cache, seen, done = carry
      carry = step, out, last, positions, _grow_cache(cache, window), seen, done
      # Every row writes its next slot at `positions`: this window holds it while below it.
      fits = lambda carry, window=window: jnp.max(carry[3]) < window
      carry = jax.lax.while_loop(lambda carry: cond(carry) & fits(carry), body, carry)
    return carry[1]

  def lower(self, batch: int, prompt_len: int, max_new_tokens: int, **sampling):
    """(the whole decoding loop `generate` runs for `batch` prompts of `prompt_len` tokens,
    one of its steps at the full cache), lowered and not run: with abstract parameters
    (jax.ShapeDtypeStruct on another platform's device) they compile for it (gpt_jax.aot)."""
    req = self._request([[0] * prompt_len] * batch, max_new_tokens, 1, False, None, 0,
                        **sampling)
    rows = req.tokens.shape[0]
    cache = jax.eval_shape(lambda: init_cache(dataclasses.replace(self.cfg,
                                                                  max_len=req.cache_len), rows))
    seen = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size if req.mode.penalty else 0), bool)
    tokens = np.zeros(rows, np.int32)
    with self._on_devices():
      loop = self._generate.lower(self.params, req.tokens, req.lengths, req.max_new,
                                  req.dynamic, mode=req.mode, cache_len=req.cache_len)
      step = self._step.lower(self.params, tokens, tokens, cache, seen, np.int32(1),
                              req.dynamic, mode=req.mode)
    return loop, step

  # ---------------------------------------------------------------- host side

  def _request(self, prompts, max_new_tokens, num_samples, truncate, eos_id, seed,
               temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> _Request:
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if num_samples < 1:
      raise ConfigError(f'num_samples must be >= 1, got {num_samples}')
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ConfigError('Every prompt needs at least one token')
    if isinstance(max_new_tokens, (int, np.integer)):
      max_new_tokens = [int(max_new_tokens)] * len(prompts)
    if len(max_new_tokens) != len(prompts):
      raise ConfigError(f'{len(max_new_tokens)} max_new_tokens for {len(prompts)} prompts')
    context = self.cfg.max_len
    for i, (prompt, n) in enumerate(zip(prompts, max_new_tokens)):
      if n <= 0:
        raise ConfigError(f'max_new_tokens must be positive, got {n}')
      if len(prompt) + n > context:
        if truncate and n < context:
          prompts[i] = prompt[len(prompt) + n - context:]  # keep the end of the prompt
        else:
          raise ConfigError(
              f'Prompt of {len(prompt)} tokens + max_new_tokens={n} exceeds the model\'s '
              f'context of {context} tokens' + (f' (truncate=True, --truncate_prompt in '
                                                f'gpt_jax.sample, keeps its last {context - n})'
                                                if n < context else ''))
    prompts = [p for p in prompts for _ in range(num_samples)]
    max_new = np.repeat(np.asarray(max_new_tokens, np.int32), num_samples)
    rows = len(prompts)
    if self.placement:  # rows that split evenly over the batch shards; the extra end at once
      padding = self.placement.rows(rows) - rows
      prompts += [[0]] * padding
      max_new = np.concatenate([max_new, np.ones(padding, np.int32)])
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), length_bucket(int(lengths.max()), context)), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    sampled = temperature != 0
    mode = _Mode(greedy=not sampled, top_k=min(int(top_k), self.cfg.vocab_size) if sampled else 0,
                 top_p=sampled and top_p < 1.0, penalty=repetition_penalty != 1.0)
    dynamic = (np.int32(PAD if eos_id is None else eos_id), np.int32(seed),
               np.float32(temperature or 1.0), np.float32(top_p), np.float32(repetition_penalty))
    width = length_bucket(int((lengths + max_new).max()), context)
    return _Request(tokens, lengths, max_new, width, mode, dynamic, rows)

  def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
             eos_id: int | None = None, num_samples: int = 1, truncate: bool = False,
             seed: int = 0, **sampling) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [rows], until every row is done.

    rows = len(prompts) * num_samples. A row is done after its eos_id or its max_new_tokens
    (an int, or one per prompt); a done row yields PAD (-1). sampling: temperature (1.0),
    top_k (0: off), top_p (1.0: off), repetition_penalty (1.0: off). A prompt that does not fit
    the context with its max_new_tokens is an error, or loses its first tokens if truncate.
    """
    # Checked now, not at the first next(): errors come before the caller prints anything.
    req = self._request(prompts, max_new_tokens, num_samples, truncate, eos_id, seed, **sampling)
    return self._stream(req)

  def _stream(self, req: _Request) -> Iterator[np.ndarray]:
    with self._on_devices():
      tokens, cache, seen = self._prefill(self.params, req.tokens, req.lengths, req.dynamic,
                                          mode=req.mode, cache_len=req.cache_len)
    positions = req.lengths.copy()
    done = np.zeros(len(req.lengths), bool)
    for step in range(int(req.max_new.max())):
      if step + 1 < req.max_new.max():  # dispatched before this step's tokens are read back
        with self._on_devices():
          next_tokens, cache, seen = self._step(self.params, tokens, positions, cache, seen,
                                                np.int32(step + 1), req.dynamic, mode=req.mode)
      host = np.where(done, PAD, np.asarray(tokens))
      yield host[:req.rows]
      done |= (host == req.dynamic[0]) | (step + 1 >= req.max_new)
      if done.all():
        return
      tokens, positions = next_tokens, np.minimum(positions + 1, req.cache_len - 1)

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
               eos_id: int | None = None, num_samples: int = 1, truncate: bool = False,
               seed: int = 0, **sampling) -> list[list[int]]:
    """New tokens of every row (ending with eos_id if it came), in one jitted call.

    Arguments as `stream`; equals collecting `stream`'s tokens for the same seed.
    """
    req = self._request(prompts, max_new_tokens, num_samples, truncate, eos_id, seed, **sampling)
    with self._on_devices():
      out = np.asarray(self._generate(self.params, req.tokens, req.lengths, req.max_new,
                                      req.dynamic, mode=req.mode, cache_len=req.cache_len))
    return [[int(t) for t in row[:n] if t != PAD]
            for row, n in zip(out[:req.rows], req.max_new)]


# ------------------------------------------------------------------ text


class RowText:
  """One row's text as its tokens arrive: whole characters only, cut at the first stop string."""

  def __init__(self, tokenizer, stop: Sequence[str]):
    self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
    self.tokens: list[int] = []
    self.emitted = 0   # characters of the text handed out so far
    self.done = False

  def add(self, token: int) -> str:
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
    return '' if text.endswith('\ufffd') else self._advance(text, final=False)

  def finish(self) -> str:
    text = '' if self.done else self._advance(self.tokenizer.decode(self.tokens), final=True)
    self.done = True
    return text

  def _advance(self, text: str, final: bool) -> str:
    hits = [i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0]
    if hits:
      end, self.done = min(hits), True
    elif final:
      end = len(text)
    else:  # hold back an ending that may grow into a stop string
      end = len(text) - max([n for s in self.stop for n in range(1, len(s))
                             if text.endswith(s[:n])], default=0)
    piece, self.emitted = text[self.emitted:end], max(self.emitted, end)
    return piece


def stream_text(generator: Generator, tokenizer, prompts: Sequence[str],
                max_new_tokens: int | Sequence[int], *, stop: Sequence[str] = (),
                num_samples: int = 1, **kwargs) -> Iterator[tuple[int, str]]:
  """Yields (row, new text) as it is generated; row = prompt index * num_samples + sample.

  A row ends at end-of-text, at max_new_tokens, or before the first of the `stop` strings
  (which is not part of its text). kwargs: as Generator.stream (seed, truncate, temperature,
  top_k, top_p, repetition_penalty).
  """
  rows = [RowText(tokenizer, stop) for _ in range(len(prompts) * num_samples)]
  encoded = [encode_prompt(tokenizer, p) for p in prompts]
  tokens = generator.stream(encoded, max_new_tokens, eos_id=tokenizer.eos_id,
                            num_samples=num_samples, **kwargs)  # raises here if the request is bad
  return _text_pieces(tokens, rows, ends=(PAD, tokenizer.eos_id))


def _text_pieces(tokens: Iterator[np.ndarray], rows: list[RowText], ends: tuple):
  for step_tokens in tokens:
    for r, token in enumerate(step_tokens):
      if rows[r].done:
        continue
      piece = rows[r].finish() if token in ends else rows[r].add(int(token))
      if piece:
        yield r, piece
    if all(row.done for row in rows):
      return
  for r, row in enumerate(rows):
    piece = row.finish()
    if piece:
      yield r, piece


def generate_text(generator: Generator, tokenizer, prompts: Sequence[str],
                  max_new_tokens: int | Sequence[int], **kwargs) -> list[str]:
  """The continuation of each prompt (num_samples per prompt, consecutive); see stream_text."""
  texts = [''] * (len(prompts) * kwargs.get('num_samples', 1))
  for r, piece in stream_text(generator, tokenizer, prompts, max_new_tokens, **kwargs):
    texts[r] += piece
  return texts
