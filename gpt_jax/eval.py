r"""Evaluate a workdir's parameters on a whole split: loss, perplexity and bits per byte.

  python -m gpt_jax.eval --workdir=runs/default                       # config.data.val_split
  python -m gpt_jax.eval --workdir=runs/default --split=train
  python -m gpt_jax.eval --workdir=runs/gpt2 --text_files='books/*.txt' --split=validation

Restores only the parameters (latest or --step), rebuilds the model and tokenizer from the
workdir, and reads the split through gpt_jax.data (the workdir's dataset, or --text_files with
the text_files builder: `validation` is the last data.val_fraction of each file). The split's
token stream (documents joined by EOS, as in training) is cut into windows of --seq_len tokens;
every token but the first is predicted exactly once, from the tokens before it in its window.

  loss           mean cross-entropy in nats per predicted token
  perplexity     exp(loss)
  bits_per_byte  total nats / (ln 2 x UTF-8 bytes of the split's text): comparable across
                 tokenizers (EOS predictions count in the numerator, as in training)

Batches are sharded over all local devices (data parallel, parameters replicated). The result
is printed and written to <workdir>/eval/<dataset>-<split>-step<step>.json.
"""

import glob
import json
import math
import os
import re
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from gpt_jax import checkpoint, cli, data
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import Transformer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A gpt_jax workdir (trained or converted).')
  flags.DEFINE_string('split', '', 'Split to evaluate ("": config.data.val_split).')
  flags.DEFINE_string('text_files', '', 'Evaluate on these local text files (a glob) instead '
                      "of the workdir's dataset.")
  flags.DEFINE_integer('seq_len', 0, 'Tokens per window (0: config.data.seq_len).')
  flags.DEFINE_integer('batch_size', 0, 'Windows per batch (0: config.data.batch_size); '
                       'rounded up to a multiple of the device count.')
  flags.DEFINE_string('tfds_data_dir', None, "TFDS data dir (default: the workdir config's).")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')


def windows(tokens: np.ndarray, seq_len: int, batch_size: int):
  """Batches {'inputs', 'targets', 'weights'} [batch_size, seq_len] covering tokens[1:] once.

  Window w predicts tokens[w * seq_len + 1 : (w + 1) * seq_len + 1]; the last window and the
  last batch are padded with weight 0.
  """
  num_windows = -(-(len(tokens) - 1) // seq_len)
  for first in range(0, num_windows, batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ('inputs', 'targets')}
    batch['weights'] = np.zeros((batch_size, seq_len), np.float32)
    for row, w in enumerate(range(first, min(first + batch_size, num_windows))):
      start = w * seq_len
      inputs = tokens[start:start + seq_len]
      targets = tokens[start + 1:start + seq_len + 1]
      batch['inputs'][row, :len(inputs)] = inputs
      batch['targets'][row, :len(targets)] = targets
      batch['weights'][row, :len(targets)] = 1
    yield batch


def evaluate(workdir: str, split: str = '', text_files: str = '', seq_len: int = 0,
             batch_size: int = 0, step: int | None = None, tfds_data_dir: str | None = None,
             progress_bar: bool = False) -> dict:
  """Evaluates and writes the result JSON; returns the result."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist')
  config = checkpoint.load_config(workdir)
  data_config = config.data
  if text_files:
    if not glob.glob(os.path.expanduser(text_files), recursive=True):
      raise FileNotFoundError(f'--text_files {text_files!r} matches no files')
    data_config.text_files = text_files
  if tfds_data_dir is not None:
    data_config.tfds_data_dir = tfds_data_dir
  split = split or data_config.val_split
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  model_cfg, params, step = checkpoint.load_model(workdir, step)
  seq_len = seq_len or min(data_config.seq_len, model_cfg.max_len)
  if not 0 < seq_len <= model_cfg.max_len:
    raise ConfigError(f'--seq_len must be in [1, {model_cfg.max_len}] (the model\'s context), '
                      f'got {seq_len}')
  devices = jax.local_devices()
  batch_size = batch_size or data_config.batch_size
  if batch_size <= 0:
    raise ConfigError(f'--batch_size must be positive, got {batch_size}')
  batch_size = -(-batch_size // len(devices)) * len(devices)

  tokens = data.token_stream(data_config, tokenizer, workdir, split)
  if len(tokens) < 2:
    raise ConfigError(f'Split {split!r} has {len(tokens)} tokens: nothing to predict')
  num_bytes = sum(len(text.encode('utf-8')) for text in data.open_texts(data_config, split))

  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  params = jax.device_put(params, replicated)
  model = Transformer(model_cfg)

  @jax.jit
  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(losses * batch['weights'])

  total_windows = -(-(len(tokens) - 1) // seq_len)
  progress = tqdm.tqdm(total=-(-total_windows // batch_size), unit='batch', dynamic_ncols=True,
                       disable=not progress_bar, desc=f'eval {split}')
  start = time.perf_counter()
  loss_sum = 0.0
  for batch in windows(tokens, seq_len, batch_size):
    loss_sum += float(eval_step(params, jax.device_put(batch, rows)))
    progress.update()
  progress.close()

  count = len(tokens) - 1
  loss = loss_sum / count
  name = data_config.text_files and 'text_files' or data_config.tfds_name
  result = {
      'step': int(step), 'dataset': name, 'split': split, 'text_files': data_config.text_files,
      'loss': loss, 'perplexity': math.exp(min(loss, 700)),
      'bits_per_byte': loss_sum / (math.log(2) * num_bytes) if num_bytes else None,
      'loss_sum': loss_sum, 'tokens': count, 'bytes': num_bytes, 'seq_len': seq_len,
      'batch_size': batch_size, 'devices': len(devices),
      'seconds': round(time.perf_counter() - start, 3),
  }
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, re.sub(r'[^\w.-]', '_', f'{name}-{split}-step{step}') + '.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  result['path'] = path
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_logs(logging.ERROR)
  with cli.one_line_errors():
    if not FLAGS.workdir:
      raise ConfigError('--workdir is required')
    if FLAGS.seq_len < 0 or FLAGS.batch_size < 0:
      raise ConfigError('--seq_len and --batch_size must be positive (0: from the config)')
    result = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.text_files, FLAGS.seq_len,
                      FLAGS.batch_size, FLAGS.step, FLAGS.tfds_data_dir, FLAGS.progress_bar)
  print(f"{result['dataset']} {result['split']} (step {result['step']}): loss "
        f"{result['loss']:.4f}, perplexity {result['perplexity']:.2f}, bits/byte "
        f"{result['bits_per_byte']:.4f} over {result['tokens']:,} tokens, {result['bytes']:,} "
        f"bytes -> {result['path']}")


if __name__ == '__main__':
  define_flags()
  app.run(main)
