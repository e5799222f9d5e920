"""A Llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied embeddings.

  python -m gpt_jax.train --config=configs/llama_style.py --workdir=runs/llama_style

Same corpus, width and depth as configs/default.py, so the two layouts compare directly. No
result is recorded for it; the speedrun config (configs/speedrun_shakespeare.py) measures what the
same layout changes buy on tiny Shakespeare.
"""

from gpt_jax.config import base_config


def get_config():
  config = base_config()
  config.data.tfds_name = 'pydoc_topics'
  config.data.vocab_size = 1024
  config.data.seq_len = 128
  config.data.batch_size = 16

  config.model.max_len = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.emb_dim = 128
  config.model.mlp_dim = 352     # SwiGLU has 3 matrices: ~2/3 of 4 x emb_dim keeps the FLOPs
  config.model.position = 'rope'
  config.model.norm = 'rmsnorm'
  config.model.norm_eps = 1e-6
  config.model.mlp = 'swiglu'
  config.model.use_bias = False
  config.model.tie_embeddings = False
  config.model.dropout = 0.1

  config.optim.lr = 2e-3
  config.train.num_steps = 1000
  config.train.sample_prompt = 'The '
  return config
