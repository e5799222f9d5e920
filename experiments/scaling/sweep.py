"""Six model sizes, 14k to 442k non-embedding parameters (32x), token budgets growing with size.

  python -m gpt_jax.sweep --sweep=experiments/scaling/sweep.py --root=runs/scaling \
      --config.data.text_files=/path/to/tinyshakespeare.txt
  python experiments/scaling/fit.py --root=runs/scaling

Non-embedding parameters are 12 x num_layers x emb_dim^2 (no biases; mlp_dim = 4 x emb_dim).
Each step is 16 x 128 characters. The largest model trains 2000 steps (4.1M characters, about
4 epochs of the training split), a model k times smaller k^0.2 times fewer (1000 steps for the
smallest): enough steps for the small models to get past the bigram plateau. The peak learning
rate shrinks with width as 4e-3 * sqrt(128 / emb_dim) (9.2e-3 at width 24, 4.6e-3 at 96).
"""

from gpt_jax import sweep

BASE_CONFIG = 'config.py'  # experiments/scaling/config.py

# (num_layers, num_heads, emb_dim): 12 L d^2 = 14k, 25k, 55k, 98k, 230k, 442k.
SIZES = [(2, 2, 24), (2, 2, 32), (2, 3, 48), (2, 4, 64), (3, 4, 80), (4, 4, 96)]
LARGEST_STEPS = 2000
STEPS_EXPONENT = 0.2  # steps (and tokens) proportional to N^0.2


def non_embedding_params(num_layers: int, emb_dim: int) -> int:
  return 12 * num_layers * emb_dim ** 2


def get_sweep():
  largest = non_embedding_params(SIZES[-1][0], SIZES[-1][2])
  steps = [round(LARGEST_STEPS * (non_embedding_params(l, d) / largest) ** STEPS_EXPONENT / 50)
           * 50 for l, _, d in SIZES]
  return sweep.zip({
      'model.num_layers': [l for l, _, _ in SIZES],
      'model.num_heads': [h for _, h, _ in SIZES],
      'model.emb_dim': [d for _, _, d in SIZES],
      'model.mlp_dim': [4 * d for _, _, d in SIZES],
      'train.num_steps': steps,
      'optim.lr': [float(f'{4e-3 * (128 / d) ** 0.5:.2g}') for _, _, d in SIZES],
  })
