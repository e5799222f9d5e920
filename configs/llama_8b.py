"""A Llama-3-8B-shaped model (8.03B parameters) for TPU v5p-64 and larger slices.

  python -m gpt_jax.train --config=configs/llama_8b.py --workdir=gs://BUCKET/llama_8b \
      --config.data.tfds_name=c4 --config.data.spm_model=/path/to/32k.model
  python -m gpt_jax.aot --config=configs/llama_8b.py --topology=v5p-64  # what fits, without a TPU

32 layers x 4096, 32 query / 8 kv heads (head_dim 128), SwiGLU 14336, vocabulary 128,256 (Llama
3's), untied embeddings, context 4096; bf16 compute over float32 weights and AdamW; pure FSDP
over the chips (on 512 chips and more, `--config.mesh.data=8`: FSDP within 64-chip groups).
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = 'c4'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 128_256
  config.data.seq_len = 4096
  config.data.batch_size = 64
  config.data.prefetch = 4

  config.model.vocab_size = 128_256
  config.model.max_len = 4096
  config.model.num_layers = 32
  config.model.num_heads = 32
  config.model.num_kv_heads = 8
  config.model.emb_dim = 4096
  config.model.mlp_dim = 14336
  config.model.position = 'rope'
  config.model.rope_theta = 500_000.0
  config.model.norm = 'rmsnorm'
  config.model.norm_eps = 1e-5
  config.model.mlp = 'swiglu'
  config.model.use_bias = False
  config.model.tie_embeddings = False
  config.model.dropout = 0.0
  config.model.compute_dtype = 'bfloat16'
  config.model.remat = 'full'
  config.model.scan_layers = True

  config.mesh.data = 1
  config.mesh.fsdp = -1

  config.optim.lr = 3e-4
  config.optim.warmup_steps = 2000
  config.optim.b2 = 0.95
  config.train.num_steps = 100_000
  config.train.log_every = 100
  config.train.eval_every = 2000
  config.train.eval_batches = 20
  config.train.sample_tokens = 0
  config.checkpoint.every_steps = 1000
  return config
