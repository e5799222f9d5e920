"""A 1B-class Llama-layout model (886.1M parameters) for a TPU v5p-8.

  python -m gpt_jax.train --config=configs/llama_1b.py --workdir=gs://BUCKET/llama_1b \
      --config.data.tfds_name=c4 --config.data.spm_model=/path/to/32k.model
  python -m gpt_jax.aot --config=configs/llama_1b.py --topology=v5p-8   # what fits, without a TPU

16 layers x 2048, 16 query / 8 kv heads (head_dim 128), SwiGLU 5632, vocabulary 32,000, untied
embeddings, context 4096; bf16 compute over float32 weights and AdamW, splash attention on TPU,
full remat, scanned layers; pure FSDP over the chips.

On a v5p-8 (`gpt_jax.aot`, 2026-12-06): mesh fsdp 4, 4 sequences of 4096 per chip (global batch
16), 12.05 GB of HBM per chip of 102 GB; the largest global batch that fits is 196. Roofline:
bound by compute, MFU <= 100% (splash's products run in its kernel, so the bound is the model's
FLOPs at the chip's peak). Decoding 8 sequences on one chip (`--decode`): 5.72 GB.
"""

from gpt_jax.config import llama_pretraining_config


def get_config():
  return llama_pretraining_config(
      num_layers=16, emb_dim=2048, num_heads=16, num_kv_heads=8, mlp_dim=5632,
      vocab_size=32_000, seq_len=4096, batch_size=16)
