r"""Fits L(N) = E + A * N^-alpha to the scaling sweep's final validation losses.

  python experiments/scaling/fit.py --root=runs/scaling [--out=experiments/scaling]

N is the number of non-embedding parameters (Kaplan et al.'s N: without the token and position
embeddings). Writes fit.json, results.csv, scaling_fit.png and loss_curves.png to --out, and the
result tables into README.md there, between the `fit:start` / `fit:end` markers.
"""

import json
import os
import re

from absl import app, flags
import numpy as np
from scipy import optimize

from gpt_jax import report

HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = flags.DEFINE_string('root', 'runs/scaling', 'Root of the sweep (its workdirs).')
_OUT = flags.DEFINE_string('out', HERE, 'Where the fit, tables, plots and README are.')

N_SCALE = 1e5  # fit A' = A / N_SCALE^alpha, so that the fitted numbers are of order one


def saturating(n, e, a, alpha):
  return e + a * (n / N_SCALE) ** -alpha


def fit(n: np.ndarray, loss: np.ndarray) -> dict:
  """L = E + A N^-alpha (scipy curve_fit), and the pure power law L = A N^-alpha for reference."""
  # Start from the pure power law fitted in log-log space, with E = 0.
  slope, intercept = np.polyfit(np.log(n / N_SCALE), np.log(loss), 1)
  p0 = (0.5 * loss.min(), np.exp(intercept), -slope)
  params, cov = optimize.curve_fit(saturating, n, loss, p0=p0, bounds=([0, 0, 0], [10, 100, 5]),
                                   maxfev=20_000)
  e, a, alpha = params
  errors = np.sqrt(np.diag(cov))
  predicted = saturating(n, *params)
  return {
      'E': e, 'E_stderr': errors[0], 'alpha': alpha, 'alpha_stderr': errors[2],
      'A': a * N_SCALE ** alpha, 'A_at_1e5': a,
      'residuals': (loss - predicted).tolist(), 'predicted': predicted.tolist(),
      'rms_residual': float(np.sqrt(np.mean((loss - predicted) ** 2))),
      'power_law_alpha': -slope, 'power_law_A': float(np.exp(intercept) * N_SCALE ** -slope),
  }


def plot(path: str, n: np.ndarray, loss: np.ndarray, result: dict) -> None:
  plt = report._pyplot()  # pylint: disable=protected-access
  fig, (ax, ax_res) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True,
                                   gridspec_kw={'height_ratios': [3, 1]})
  grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
  e, alpha = result['E'], result['alpha']
  ax.plot(n, loss, 'o', color='C0', label='final validation loss')
  ax.plot(grid, saturating(grid, e, result['A_at_1e5'], alpha), '-', color='C0',
          label=f"E + A N^-α: E = {e:.2f} ± {result['E_stderr']:.2f}, "
          f"α = {alpha:.2f} ± {result['alpha_stderr']:.2f}")
  ax.plot(grid, result['power_law_A'] * grid ** -result['power_law_alpha'], ':', color='C1',
          label=f"A N^-α (no E): α = {result['power_law_alpha']:.3f}")
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FormatStrFormatter('%.1f'))
  ax.set_ylabel('validation loss (nats / character)')
  ax.set_title('tiny Shakespeare, char-level: loss against model size')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  ax_res.axhline(0, color='gray', lw=0.8)
  ax_res.plot(n, result['residuals'], 'o-', color='C0')
  ax_res.set_xscale('log')
  ax_res.set_xlabel('non-embedding parameters N')
  ax_res.set_ylabel('residual')
  ax_res.grid(alpha=0.3, which='both')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def tables(runs: list[dict], result: dict) -> str:
  lines = ['| layers | emb_dim | non-emb params N | steps | characters | train loss (last batch) | '
           'val loss | fit | residual | tokens/s |', '|' + '---|' * 10]
  for run, predicted, residual in zip(runs, result['predicted'], result['residuals']):
    c = run['config']
    lines.append(
        f"| {c['model.num_layers']} | {c['model.emb_dim']} | {run['non_embedding_params']:,} | "
        f"{run['step']:,} | {run['tokens'] / 1e6:.2f}M | {run['final_train_loss']:.3f} | "
        f"{run['final_val_loss']:.4f} | {predicted:.4f} | {residual:+.4f} | "
        f"{run['tokens_per_s']:,.0f} |")
  lines += [
      '', '| fit | value |', '|---|---|',
      f"| α | {result['alpha']:.3f} ± {result['alpha_stderr']:.3f} |",
      f"| E (nats / character) | {result['E']:.3f} ± {result['E_stderr']:.3f} |",
      f"| A | {result['A']:.3g} |",
      f"| RMS residual | {result['rms_residual']:.4f} |",
      f"| α of a pure power law A·N^-α (no E) | {result['power_law_alpha']:.3f} |",
  ]
  return '\n'.join(lines)


def main(argv):
  del argv
  runs, _ = report.collect(_ROOT.value)
  runs = sorted((r for r in runs if r['finished']), key=lambda r: r['non_embedding_params'])
  if len(runs) < 4:
    raise SystemExit(f'error: {len(runs)} finished runs under {_ROOT.value}; the fit needs 4+')
  n = np.array([r['non_embedding_params'] for r in runs], float)
  loss = np.array([r['final_val_loss'] for r in runs])
  result = fit(n, loss)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'fit.json'), 'w') as f:
    json.dump({'N': n.tolist(), 'val_loss': loss.tolist(), **result}, f, indent=1, default=float)
  fields = ['model.num_layers', 'model.num_heads', 'model.emb_dim', 'model.mlp_dim',
            'train.num_steps']
  report.write_csv(os.path.join(out, 'results.csv'), runs, fields)
  report.plot_loss_curves(os.path.join(out, 'loss_curves.png'), runs)
  plot(os.path.join(out, 'scaling_fit.png'), n, loss, result)
  markdown = tables(runs, result)
  readme = os.path.join(out, 'README.md')
  if os.path.exists(readme):
    with open(readme) as f:
      text = f.read()
    with open(readme, 'w') as f:
      f.write(re.sub(r'(<!-- fit:start -->\n).*?(<!-- fit:end -->)',
                     lambda m: m[1] + markdown + '\n' + m[2], text, flags=re.S))
  print(markdown)


if __name__ == '__main__':
  app.run(main)
