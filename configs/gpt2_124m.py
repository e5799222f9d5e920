"""GPT-2 small's shape on a TFDS corpus, for a TPU v5e-8 (or any accelerator host).

  python -m gpt_jax.train --config=configs/gpt2_124m.py --workdir=gs://BUCKET/gpt2_124m \
      --config.data.tfds_name=lm1b
  python -m gpt_jax.aot --config=configs/gpt2_124m.py --topology=v5e-8

12 layers x 768, 12 heads, context 1024, GPT-2 layout (learned positions, pre-LayerNorm with bias,
GELU, tied embeddings) with a 32,000-piece sentencepiece vocabulary trained on the corpus (the
embedding has the tokenizer's rows, 110.4M parameters; GPT-2's own BPE has 50,257); bfloat16
compute, no remat.

On a v5e-8 (`gpt_jax.aot`, 2026-12-06): mesh data 8, 16 sequences of 1024 per chip, 10.60 GB of
HBM per chip of 16 GB, roofline MFU 32% (bound by the HBM term: 202 ms of traffic per step
against 55 ms of compute).
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = 'lm1b'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 32_000
  config.data.seq_len = 1024
  config.data.batch_size = 128   # 16 sequences per chip on a v5e-8
  config.data.prefetch = 4
  config.data.streaming = 'true'  # tokenized on the fly by 8 processes per host
  config.data.worker_count = 8

  config.model.vocab_size = 0  # the tokenizer's: 32,000
  config.model.max_len = 1024
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.emb_dim = 768
  config.model.mlp_dim = 3072
  config.model.dropout = 0.0
  config.model.compute_dtype = 'bfloat16'

  config.optim.lr = 6e-4
  config.optim.warmup_steps = 2000
  config.optim.b2 = 0.95
  config.optim.min_lr_ratio = 0.1
  config.train.num_steps = 100_000
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.train.eval_batches = 50
  config.checkpoint.every_steps = 2000
  return config
