"""CPU speedrun: character-level tiny Shakespeare to validation loss <= 1.886, fastest wall time.

  python -m gpt_jax.train --config=configs/speedrun_shakespeare.py --workdir=runs/speedrun \
      --config.data.text_files=/path/to/tinyshakespeare.txt

nanoGPT's baby GPT (4 layers x 128, context 64, batch 12, char-level, nanoGPT's split) reaches
validation loss 1.886 after 2000 steps at lr 1e-3. This config gets there in fewer steps: RoPE
and RMSNorm instead of learned positions and LayerNorm, a higher learning rate with a short
warmup and a cosine decay to zero, and no start-up work beyond what training needs (no matmul
peak measurement, no final sample). Its one evaluation, at the last step, covers the whole
validation split: all 1,716 windows of 65 tokens (111,540 tokens, 143 batches of 12).
`experiments/speedrun/run.py` times the whole process against the PyTorch reference and keeps
the record table (experiments/speedrun/README.md).
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
  config.model.use_bias = False
  config.model.position = 'rope'
  config.model.norm = 'rmsnorm'
  config.optim.lr = 6e-3
  config.optim.warmup_steps = 30
  config.optim.min_lr_ratio = 0.0
  config.optim.b2 = 0.99
  config.optim.weight_decay = 0.1
  config.train.num_steps = 900
  config.optim.decay_steps = 900
  config.train.log_every = 100
  config.train.eval_every = 900            # once, at the end
  config.train.eval_batches = 1_000_000   # all of the validation split
  config.train.sample_tokens = 0
  config.train.measure_peak = False
  config.train.progress_bar = False
  config.checkpoint.every_steps = 100_000  # only the last step's (train.py always saves it)
  return config
