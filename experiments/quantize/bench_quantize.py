r"""Decoding speed and validation loss of float32, int8 (weight-only) and int8_dynamic weights.

  python experiments/quantize/bench_quantize.py --workdir=runs/shakespeare_char [--rounds=3]

Speed: GPT-2 124M's shapes (12 layers x 768, vocabulary 50,304, randomly initialised: speed
does not depend on the values), greedy decoding of --new_tokens after a 16-token prompt at
batch 1 and 8 with `quantize.generator(...).generate` (prefill and loop in one jitted call, as
`gpt_jax.sample` runs). Each round times every form once, starting with a different one, and
the ratio against float32 is taken within the round (this machine has slow spells); the table
gives the median over rounds and the range.

Validation loss: the trained model in --workdir over its whole validation split (windows of
its seq_len), float32 against each quantized form; and greedy agreement: 8 prompts of 16
validation tokens, 48 new tokens each, the share of new tokens equal to float32's at the same
place.
"""

import json
import os
import statistics
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt_jax import checkpoint, data, eval as eval_lib, quantize
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.model import ModelConfig, Transformer

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir for the validation loss.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds (each times every form once).')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens decoded per timed call.')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Rows decoded at once.')
_JSON = flags.DEFINE_string('json', '', 'Also write every timing here.')

MODES = ('none', 'int8', 'int8_dynamic')
NAMES = {'none': 'float32', 'int8': 'int8 weight-only', 'int8_dynamic': 'int8_dynamic'}
GPT2_SHAPES = ModelConfig(vocab_size=50304, max_len=1024, num_layers=12, num_heads=12,
                          emb_dim=768, mlp_dim=3072)


def speed(rounds: int, new_tokens: int, batches: list[int]) -> dict:
  cfg = GPT2_SHAPES
  params = nn.unbox(jax.jit(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 8), jnp.int32)))(
      jax.random.key(0)))['params']
  params = jax.device_get(params)
  forms = {mode: quantize.apply(params, mode) for mode in MODES}
  memory = {mode: quantize.param_bytes(p) for mode, p in forms.items()}
  generators = {mode: quantize.generator(cfg, p) for mode, p in forms.items()}
  del params, forms
  rng = np.random.default_rng(0)
  results = {}
  for batch in batches:
    prompts = rng.integers(0, 50257, (batch, 16)).tolist()
    tokens = {}
    for mode, gen in generators.items():  # compiles
      tokens[mode] = gen.generate(prompts, new_tokens, temperature=0)
    times = {mode: [] for mode in MODES}
    for r in range(rounds):
      order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
      for mode in order:
        start = time.perf_counter()
        generators[mode].generate(prompts, new_tokens, temperature=0)
        times[mode].append(time.perf_counter() - start)
      print(f'batch {batch} round {r}: ' + ', '.join(
          f'{NAMES[m]} {batch * new_tokens / times[m][-1]:.1f} tok/s' for m in MODES), flush=True)
    results[batch] = {
        mode: {'tokens_per_s': [batch * new_tokens / t for t in times[mode]],
               'ratio': [times['none'][i] / t for i, t in enumerate(times[mode])],
               'same_greedy_tokens_as_float32': tokens[mode] == tokens['none'],
               'param_bytes': memory[mode]}
        for mode in MODES}
  return results


def validation_losses(workdir: str) -> dict:
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  cfg, params, step = checkpoint.load_model(workdir)
  tokens = data.token_stream(config.data, tokenizer, workdir, config.data.val_split)
  seq_len = min(config.data.seq_len, cfg.max_len)
  model = Transformer(cfg)

  @jax.jit
  def loss_sum(params, batch):
    logits, _ = quantize.apply_model(model, params, batch['inputs'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(losses * batch['weights'])

  out = {'step': int(step), 'tokens': int(len(tokens) - 1)}
  prompts = [tokens[i * 1000:i * 1000 + 16].tolist() for i in range(8)]
  greedy = {}
  for mode in MODES:
    quantized = quantize.apply(params, mode)
    total = sum(float(loss_sum(quantized, batch))
                for batch in eval_lib.windows(tokens, seq_len, 64))
    out[mode] = total / (len(tokens) - 1)
    greedy[mode] = quantize.generator(cfg, quantized, tokenizer.vocab_size).generate(
        prompts, 48, temperature=0)
    same = [a == b for row, ref in zip(greedy[mode], greedy['none']) for a, b in zip(row, ref)]
    out[f'{mode}_greedy_agreement'] = sum(same) / len(same)
  return out


def main(argv):
  del argv
  batches = [int(b) for b in _BATCHES.value]
  losses = validation_losses(_WORKDIR.value) if _WORKDIR.value else None
  results = speed(_ROUNDS.value, _NEW.value, batches)
  print(f'\n{jax.devices()[0].device_kind}, {os.cpu_count()} cores; GPT-2 124M shapes, '
        f'{_NEW.value} new tokens, {_ROUNDS.value} rounds (median [min-max])')
  print('| form | param MB | ' + ' | '.join(f'batch {b} tok/s | vs float32' for b in batches)
        + ' |')
  print('|---|---|' + '---|---|' * len(batches))
  for mode in MODES:
    cells = []
    for b in batches:
      r = results[b][mode]
      cells += [f"{statistics.median(r['tokens_per_s']):.1f}",
                f"{statistics.median(r['ratio']):.2f}x [{min(r['ratio']):.2f}-"
                f"{max(r['ratio']):.2f}]"]
    print(f"| {NAMES[mode]} | {results[batches[0]][mode]['param_bytes'] / 1e6:.0f} | "
          + ' | '.join(cells) + ' |')
  if losses:
    print(f"\nValidation loss of {_WORKDIR.value} (step {losses['step']}, "
          f"{losses['tokens']} tokens):")
    print('| form | loss | change | perplexity | greedy tokens equal to float32\'s |')
    print('|---|---|---|---|---|')
    for mode in MODES:
      print(f"| {NAMES[mode]} | {losses[mode]:.4f} | {losses[mode] - losses['none']:+.4f} | "
            f"{np.exp(losses[mode]):.3f} | {losses[f'{mode}_greedy_agreement']:.1%} |")
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'speed': results, 'validation_loss': losses}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
