"""CPU speedrun: character-level tiny Shakespeare to validation loss <= 1.886, fastest wall time.

  python -m gpt_jax.train --config=configs/speedrun_shakespeare.py --workdir=runs/speedrun \
      --config.data.text_files=/path/to/tinyshakespeare.txt

nanoGPT's baby GPT (4 layers x 128, context 64, batch 12, char-level, nanoGPT's split) reaches
validation loss 1.886 after 2000 steps at lr 1e-3. This config gets there in 200 steps, with
the same model size: RoPE and RMSNorm instead of learned positions and LayerNorm, RMSNorm of
each head's queries and keys, a SwiGLU MLP of as many weights as the GELU one, Muon (lr 0.015,
momentum 0.9, 3 Polar Express Newton-Schulz steps) on the hidden matrices and AdamW (lr 3e-2,
beta2 0.95, no weight decay) on the rest, no gradient clipping, the 4 stacked layers unrolled
in the step, and no start-up work beyond what training needs (no matmul peak measurement, no
final sample, no compilation cache to write). Its one evaluation, at the last step, covers the
whole validation split: all 1,716 windows of 65 tokens (111,540 tokens, 6 batches of 286).
Expected: validation loss 1.8787 after 200 steps (deterministic on one CPU device, but it
varies with the CPU in the fourth digit: 1.8787 on an AMD EPYC with AVX-512-bf16), the whole
process in 19.1 s against 90.1 s for the PyTorch baseline (4.73x, 2026-12-05, 2 cores);
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
  config.data.eval_batch_size = 286  # 1,716 validation windows = 6 batches of 286

  config.model.max_len = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 352     # SwiGLU: 3 x 128 x 352 weights, as many as GELU's 2 x 128 x 512
  config.model.dropout = 0.0
  config.model.use_bias = False
  config.model.scan_layers = True  # Muon orthogonalizes each kernel of all 4 layers in one op
  config.model.scan_unroll = 4     # ... and the step runs the 4 layers as straight-line code
  config.model.position = 'rope'
  config.model.norm = 'rmsnorm'
  config.model.qk_norm = True      # with the learning rates below: 200 steps instead of 275
  config.model.mlp = 'swiglu'
  config.optim.name = 'muon'
  config.optim.muon_lr = 0.015
  config.optim.muon_momentum = 0.9
  config.optim.muon_ns_coeffs = 'polar_express'
  config.optim.muon_ns_steps = 3     # the schedule's first 3 of 5 steps
  config.optim.lr = 3e-2             # AdamW's: embeddings and norm scales
  config.optim.warmup_steps = 10
  config.optim.min_lr_ratio = 0.1
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.0
  config.optim.grad_clip = 0.0       # no clipping: 1.8789 against 1.8821 with clipping at 1.0
  config.train.num_steps = 200
  config.optim.decay_steps = 200
  config.train.log_every = 25
  config.train.eval_every = 200            # once, at the end
  config.train.eval_batches = 1_000_000   # all of the validation split
  config.train.sample_tokens = 0
  config.train.measure_peak = False
  config.train.progress_bar = False
  config.train.tensorboard = False   # metrics.jsonl only: no event files to write
  config.train.compilation_cache = False  # a fresh run: nothing to read, so no cache to write
  config.checkpoint.every_steps = 100_000  # only the last step's (train.py always saves it)
  return config
