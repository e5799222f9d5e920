"""Continue training from another workdir's parameters: a converted GPT-2 or any earlier run.

  python -m gpt_jax.train --config=configs/finetune.py:runs/gpt2 --workdir=runs/gpt2_ft \
      --config.data.text_files='my_corpus/*.txt' --config.data.tfds_name=''

The model fields and tokenizer come from that workdir (so they match its checkpoint), the
optimizer starts fresh at a fine-tuning learning rate.

Expected (experiments/prune, 2026-12-06, AMD EPYC, 2 cores): 200 steps of it recover a tiny
Shakespeare model pruned to half its parameters to validation loss 2.277-2.280, within 0.03 of
the unpruned model given the same steps (2.251).
"""

from gpt_jax.checkpoint import load_config
from gpt_jax.config import base_config


def get_config(init_from: str):
  config = base_config()
  config.init_from = init_from
  config.model = load_config(init_from).model
  config.data.seq_len = min(512, config.model.max_len)
  config.data.batch_size = 8
  config.model.dropout = 0.0
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.0
  config.train.num_steps = 500
  config.train.eval_every = 100
  config.checkpoint.every_steps = 100
  return config
