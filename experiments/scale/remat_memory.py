r"""Temporary (activation) memory of the compiled train step under each remat policy.

  python experiments/scale/remat_memory.py

XLA's own memory analysis of the compiled step (`compiled.memory_analysis()`), for one model
and batch; nothing is run. Losses and gradients are identical across policies
(tests/test_model.py::test_remat_and_scan_change_nothing_numerically).
"""

import jax
import jax.numpy as jnp

from gpt_jax import lora, optim, sharding, steps
from gpt_jax.config import base_config
from gpt_jax.model import LoraConfig, ModelConfig, Transformer


def temp_bytes(cfg: ModelConfig, seq_len: int, batch: int) -> int:
  config = base_config()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model = Transformer(cfg)
  tx = optim.make_optimizer(config.optim, 100)
  every_param = lora.Trainable(LoraConfig())
  _, (abstract, _) = steps.sharded_state(model, tx, seq_len, mesh, rules, every_param)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                sharding=sharding.batch_sharding(mesh, rules))
  step = jax.jit(steps.make_train_step(model, optim.learning_rate_schedule(config.optim, 100),
                                       1, 0, every_param), donate_argnums=0)
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, {'inputs': tokens, 'targets': tokens}, {}).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  cfg = dict(vocab_size=8192, max_len=512, num_layers=8, num_heads=8, emb_dim=512, mlp_dim=2048)
  print('| remat | temporary memory of the step (MiB) | vs none |')
  print('|---|---|---|')
  reference = None
  for policy in ('none', 'dots_saveable', 'full'):
    size = temp_bytes(ModelConfig(**cfg, remat=policy), 512, 8)
    reference = reference or size
    print(f'| {policy} | {size / 2**20:.0f} | {size / reference:.2f} |', flush=True)


if __name__ == '__main__':
  main()
