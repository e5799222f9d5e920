"""A workdir with randomly initialised parameters, written in-process (no training run): for the
tests of binaries that read a trained workdir (prune, distill, export)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax import checkpoint, config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.model import ModelConfig, Transformer

TEXT = ''.join(f'{i} little lambs ate {i * 7 % 13} green leaves; ' for i in range(600))


def write_corpus(directory: str) -> str:
  """A small text file (the char tokenizer's alphabet comes from it); returns its path. Written
  once per directory: pass the session's TFDS dir, so that TFDS prepares it once per session."""
  path = os.path.join(directory, 'corpus.txt')
  if not os.path.exists(path):
    with open(path, 'w') as f:
      f.write(TEXT)
  return path


def make_workdir(workdir: str, corpus: str, tfds_dir: str, seed: int = 0, scale: float = 1.0,
                 **model) -> tuple:
  """(ModelConfig, params) of a new workdir on `corpus` (char tokenizer, 64-token context).
  `scale` multiplies every initial weight: larger weights make heads and units differ more."""
  config = config_lib.base_config()
  config.data.text_files, config.data.tokenizer = corpus, 'char'
  config.data.tfds_data_dir = tfds_dir
  config.data.seq_len, config.data.batch_size = 32, 4
  fields = dict(max_len=64, num_layers=2, num_heads=4, emb_dim=32, mlp_dim=64, dropout=0.0)
  fields.update(model)
  for key, value in fields.items():
    config.model[key] = value
  # Built from the text itself: TFDS prepares the corpus only for the tests that read batches.
  tokenizer = tokenizer_lib.build(config.data, [TEXT], os.path.join(workdir, 'tokenizer'))
  config.model.vocab_size = tokenizer.vocab_size
  cfg = ModelConfig.from_config(config.model)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(seed),
                                                   jnp.zeros((1, 8), jnp.int32)))['params']
  params = jax.tree.map(lambda x: x * scale, params)
  checkpoint.save_config(workdir, config)
  checkpoint.save_params(workdir, 1, params)
  return cfg, params
