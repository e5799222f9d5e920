"""Runs 5 train steps of one tiny config on several meshes of the available devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py WORKDIR TFDS_DIR

Prints JSON: per mesh, the losses, parameter PartitionSpecs, per-device and total bytes of
parameters + optimizer state; saves the final parameters to WORKDIR/<mesh>.npz. Run by
tests/test_sharding.py in a subprocess (the device count is fixed when jax starts).
"""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from gpt_jax import config as config_lib, data, lora, optim, sharding, steps
from gpt_jax.model import LoraConfig, ModelConfig, Transformer

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
MUON_MESHES = [(1, 1, 1), (1, 8, 1), (2, 2, 2)]  # Muon orthogonalizes sharded matrices
BF16_MESHES = [(1, 1, 1), (2, 2, 2)]  # bf16 compute: gpt_jax.backends.cpu.products's custom VJP, sharded


def main(workdir, tfds_dir):
  config = config_lib.base_config()
  overrides = {'num_layers': 2, 'num_heads': 8, 'emb_dim': 64, 'mlp_dim': 256, 'max_len': 32,
               'dropout': 0.0}
  config.model.update(overrides)
  config.data.update({'seq_len': 32, 'batch_size': 8, 'vocab_size': 512,
                      'tfds_data_dir': tfds_dir})
  tokenizer = data.prepare_tokenizer(config, workdir)
  config.model.vocab_size = tokenizer.vocab_size
  iterator = data.make_train_iterator(config, tokenizer, workdir)
  batches = [next(iterator) for _ in range(5)]
  model = Transformer(ModelConfig.from_config(config.model))
  bf16_model = Transformer(dataclasses.replace(ModelConfig.from_config(config.model),
                                               compute_dtype='bfloat16'))
  schedule = optim.learning_rate_schedule(config.optim, 5)
  trainable = lora.Trainable(LoraConfig())  # every parameter, nothing frozen

  results = {}
  runs = ([('adamw', shape) for shape in MESHES] + [('muon', shape) for shape in MUON_MESHES]
          + [('bf16', shape) for shape in BF16_MESHES])
  for variant, shape in runs:
    optimizer = 'adamw' if variant == 'bf16' else variant
    optim_config = config.optim.copy_and_resolve_references()
    optim_config.name = optimizer
    if variant in ('muon', 'bf16'):
      optim_config.warmup_steps = 0  # the full learning rate at once: 5 steps of real updates
    tx = optim.make_optimizer(optim_config, 5)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(shape))])
    rules = sharding.logical_rules(config.mesh)
    run_model = bf16_model if variant == 'bf16' else model
    init, (abstract, _) = steps.sharded_state(run_model, tx, config.data.seq_len, mesh, rules,
                                              trainable)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      rng = jax.random.key(config.seed)
      # As train.py initialises: compiled at XLA:CPU optimisation level 0 (half the compile time).
      state, frozen = steps.compile_once_run(
          jax.jit(init, out_shardings=(shardings, {})), rng)(rng)
      step = jax.jit(steps.make_train_step(run_model, schedule, 1, config.seed, trainable),
                     in_shardings=(shardings, batch_sharding, {}),
                     out_shardings=(shardings, None), donate_argnums=0)
      losses = []
      for batch in batches:
        global_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                        for k, v in batch.items()}
        state, metrics = step(state, global_batch, frozen)
        losses.append(float(metrics['train_loss']))
    name = 'x'.join(map(str, shape)) + ('' if variant == 'adamw' else f'-{variant}')
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    np.savez(os.path.join(workdir, f'{name}.npz'),
             **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
    weights = {'params': state.params, 'opt_state': state.opt_state}
    results[name] = {
        'losses': losses,
        'specs': {jax.tree_util.keystr(p): [a if a is None or isinstance(a, str) else list(a)
                                            for a in x.sharding.spec] for p, x in flat},
        'opt_specs_match': optimizer != 'adamw' or all(
            mu.sharding.spec == p.sharding.spec
            for mu, p in zip(jax.tree.leaves(state.opt_state[1][0].mu),
                             jax.tree.leaves(state.params))),
        'bytes_per_device': sharding.bytes_per_device(weights),
        'bytes_total': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights)),
    }
  print(json.dumps(results))


if __name__ == '__main__':
  main(*sys.argv[1:])
