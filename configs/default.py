"""A tiny GPT on the built-in corpus (Python's own documentation, shipped with CPython).

  python -m gpt_jax.train --config=configs/default.py --workdir=runs/default
  python -m gpt_jax.sample --workdir=runs/default --prompt="The "

4 layers x 128 wide, context 128, sentencepiece vocabulary of 1024, 1000 steps of 16 x 128 tokens:
a few minutes on 2 CPU cores.

Expected: 0.94M parameters, validation loss 3.36 nats per token after 1000 steps (5.64 for the
split's unigram entropy), in about 5 minutes on 2 shared CPU cores (2026-11-23).
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = 'pydoc_topics'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024
  config.data.seq_len = 128
  config.data.batch_size = 16

  config.model.max_len = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.dropout = 0.1

  config.optim.lr = 2e-3
  config.optim.warmup_steps = 100
  config.train.num_steps = 1000
  config.train.eval_every = 250
  config.train.sample_prompt = 'The '
  return config
