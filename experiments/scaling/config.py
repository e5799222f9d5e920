"""Base config of the scaling sweep: char-level tiny Shakespeare, context 128, batch 16.

  python -m gpt_jax.sweep --sweep=experiments/scaling/sweep.py --root=runs/scaling \
      --config.data.text_files=/path/to/tinyshakespeare.txt

`sweep.py` sets the model size and the number of steps of each point; everything else is here.
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = ''
  config.data.text_files = ''  # set on the command line: the path of tinyshakespeare.txt
  config.data.val_fraction = 0.1
  config.data.tokenizer = 'char'
  config.data.seq_len = 128
  config.data.batch_size = 16  # 2048 characters per step

  config.model.max_len = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.dropout = 0.0
  config.model.use_bias = False

  config.optim.lr = 4e-3  # sweep.py sets it per width
  config.optim.warmup_steps = 50
  config.optim.min_lr_ratio = 0.1  # cosine decay to lr / 10 at the last step
  config.optim.b2 = 0.99
  config.optim.weight_decay = 0.1

  config.train.num_steps = 1000
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.eval_batches = 54  # the whole validation split: 111,540 characters / (16 x 129)
  config.train.sample_tokens = 0
  config.checkpoint.every_steps = 500
  return config
