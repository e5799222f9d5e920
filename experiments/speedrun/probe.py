"""Times a train step for several variants in one process, alternating blocks between them.

  python experiments/speedrun/probe.py --variants='[{"name": "base"},
      {"name": "xnn", "opts": {"xla_cpu_use_xnnpack": true}},
      {"name": "b24", "batch": 24, "model": {"position": "rope"}}]'

A variant sets `model` (overrides of the baby model: 4 layers, 4 heads, emb 128, context 64,
vocab 65), `optim` (overrides of config.optim), `batch`, `seq`, `opts` (XLA compiler options
of its executable) and `flatten` (optax.flatten around the optimizer: one update over all
parameters concatenated; for timing only, as the weight-decay mask then sees one vector). The
step is config.optim's optimizer (AdamW unless `optim` says otherwise) with clipping and the
non-finite guard, as gpt_jax/train.py's. Blocks alternate between variants so that a loaded
machine slows them alike; prints compile seconds and the median block's ms/step and tokens/s
per variant.
"""
import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from gpt_jax import config as config_lib, optim  # noqa: E402
from gpt_jax.model import ModelConfig, Transformer  # noqa: E402


def build(variant):
  seq, batch = variant.get('seq', 64), variant.get('batch', 12)
  config = config_lib.base_config()
  config.model.update({'num_layers': 4, 'num_heads': 4, 'emb_dim': 128, 'mlp_dim': 512,
                       'max_len': seq, 'vocab_size': 65, 'dropout': 0.0})
  config.model.update(variant.get('model', {}))
  model = Transformer(ModelConfig.from_config(config.model))
  config.optim.update(variant.get('optim', {}))
  tx = optim.make_optimizer(config.optim, 1000)
  if variant.get('flatten'):  # one update over all parameters concatenated (decay mask aside)
    tx = optax.flatten(tx)

  def loss_fn(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()

  def train_step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state), loss

  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    tokens = rng.integers(0, 65, size=(batch, seq + 1), dtype=np.int32)
    batches.append({'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])})
  params = nn.unbox(model.init(jax.random.key(0), batches[0]['inputs'])['params'])
  state = (params, tx.init(params))
  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=0).lower(state, batches[0]).compile(
      compiler_options=variant.get('opts') or None)
  compile_s = time.perf_counter() - start
  state, loss = step(state, batches[0])
  jax.block_until_ready(state)
  return {'step': step, 'state': state, 'batches': batches, 'compile_s': compile_s,
          'tokens': batch * seq, 'times': []}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--variants', default='[{"name": "base"}]')
  p.add_argument('--steps', type=int, default=10, help='steps per block')
  p.add_argument('--rounds', type=int, default=3)
  a = p.parse_args()
  variants = json.loads(a.variants)
  runs = [build(v) for v in variants]
  for _ in range(a.rounds):
    for r in runs:
      start = time.perf_counter()
      for i in range(a.steps):
        r['state'], loss = r['step'](r['state'], r['batches'][i % 4])
      jax.block_until_ready((r['state'], loss))
      r['times'].append((time.perf_counter() - start) / a.steps * 1e3)
  base = statistics.median(runs[0]['times'])
  for v, r in zip(variants, runs):
    ms = statistics.median(r['times'])
    print(json.dumps({'name': v.get('name', ''), 'compile_s': round(r['compile_s'], 2),
                      'ms_per_step': round(ms, 2), 'tok_s': round(r['tokens'] / ms * 1e3),
                      'speed_vs_first': round(base / ms * r['tokens'] / runs[0]['tokens'], 3),
                      'blocks_ms': [round(t, 1) for t in r['times']]}), flush=True)


if __name__ == '__main__':
  main()
