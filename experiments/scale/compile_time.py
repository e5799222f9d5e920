r"""Compile time of the train step with and without nn.scan over the layers.

  python experiments/scale/compile_time.py [--layers=24]

A Python loop over blocks unrolls every layer into the XLA program, so compile time grows with
depth; `model.scan_layers=True` compiles one block and loops over stacked parameters.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from gpt_jax import lora, optim, sharding, steps
from gpt_jax.config import base_config
from gpt_jax.model import LoraConfig, ModelConfig, Transformer


def compile_seconds(cfg: ModelConfig, seq_len: int, batch: int) -> float:
  config = base_config()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model = Transformer(cfg)
  tx = optim.make_optimizer(config.optim, 100)
  schedule = optim.learning_rate_schedule(config.optim, 100)
  every_param = lora.Trainable(LoraConfig())
  _, (abstract, _) = steps.sharded_state(model, tx, seq_len, mesh, rules, every_param)
  batch_spec = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, rules))
  step = jax.jit(steps.make_train_step(model, schedule, 1, 0, every_param), donate_argnums=0)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    step.lower(abstract, {'inputs': batch_spec, 'targets': batch_spec}, {}).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=24)
  args = parser.parse_args()
  print('| layers | loop compile (s) | scan compile (s) | ratio |')
  print('|---|---|---|---|')
  for layers in sorted({4, args.layers}):
    cfg = ModelConfig(vocab_size=1024, max_len=128, num_layers=layers, num_heads=4, emb_dim=256,
                      mlp_dim=1024)
    loop = compile_seconds(cfg, 128, 8)
    scan = compile_seconds(ModelConfig(**{**cfg.__dict__, 'scan_layers': True}), 128, 8)
    print(f'| {layers} | {loop:.1f} | {scan:.1f} | {loop / scan:.1f}x |', flush=True)


if __name__ == '__main__':
  main()
