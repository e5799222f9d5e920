"""A Llama-3-8B-shaped model (8.03B parameters) for TPU v5p-64 and larger slices.

  python -m gpt_jax.train --config=configs/llama_8b.py --workdir=gs://BUCKET/llama_8b \
      --config.data.tfds_name=c4 --config.data.spm_model=/path/to/128k.model
  python -m gpt_jax.aot --config=configs/llama_8b.py --topology=v5p-64  # what fits, without a TPU

32 layers x 4096, 32 query / 8 kv heads (head_dim 128), SwiGLU 14336, vocabulary 128,256 (Llama
3's), untied embeddings, context 4096; bf16 compute over float32 weights and AdamW, splash
attention on TPU, full remat, scanned layers; pure FSDP over the chips (on 512 chips and more,
`--config.mesh.data=8`: FSDP within 64-chip groups).

`gpt_jax.aot`, 2026-12-06:
- v5p-64 (32 chips): mesh fsdp 32, 2 sequences of 4096 per chip, 19.81 GB of HBM per chip of
  102 GB; the largest global batch that fits is 384 (12 per chip). Roofline MFU <= 37%, bound by
  the HBM term (an upper estimate of the traffic, see experiments/tpu_plan).
- v5p-1024 (512 chips, `--config.mesh.data=8 --config.data.batch_size=512`): mesh 8 x 64, one
  sequence per chip, 9.06 GB per chip; four per chip (batch 2048) 33.21 GB. Roofline MFU <= 93%,
  bound by compute.
"""

from gpt_jax.config import llama_pretraining_config


def get_config():
  return llama_pretraining_config(
      num_layers=32, emb_dim=4096, num_heads=32, num_kv_heads=8, mlp_dim=14336,
      vocab_size=128_256, seq_len=4096, batch_size=64)
