"""nanoGPT's CPU "baby GPT" on character-level tiny Shakespeare.

  python -m gpt_jax.train --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char \
      --config.data.text_files=/path/to/tinyshakespeare.txt

Char-level, 4 layers, 4 heads, emb 128, context 64, batch 12, 2000 steps, lr 1e-3 decayed to
1e-4 at step 2000, no dropout, no biases (nanoGPT's default); split as nanoGPT: first 90% of the
text train, last 10% validation.
nanoGPT's README reports val loss ~1.88 for this configuration on CPU.

Expected (experiments/shakespeare_char, 2026-11-23, 2 CPU cores): validation loss 1.905 on the
whole split after 2000 steps, against 1.897 for the PyTorch reference; 1.892 with
--config.model.use_bias=True (the reference's architecture).
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = ''
  config.data.text_files = ''  # set on the command line: the path of tinyshakespeare.txt
  config.data.val_fraction = 0.1
  config.data.tokenizer = 'char'
  config.data.seq_len = 64
  config.data.batch_size = 12

  config.model.max_len = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.dropout = 0.0
  config.model.use_bias = False  # nanoGPT's train.py default (bias = False): no Dense/LN biases

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.decay_steps = 2000
  config.optim.min_lr_ratio = 0.1
  config.optim.b2 = 0.99
  config.optim.weight_decay = 0.1
  config.train.num_steps = 2000
  config.train.log_every = 100
  config.train.eval_every = 250
  config.train.eval_batches = 200
  config.checkpoint.every_steps = 1000
  config.train.sample_prompt = '\n'
  config.train.sample_tokens = 500
  return config
