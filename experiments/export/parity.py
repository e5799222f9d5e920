r"""Parity of the exported programs with gpt_jax: max |logits difference| and greedy tokens.

  python experiments/export/parity.py --workdir=runs/shakespeare_char --out=runs/export_parity

Exports the workdir as StableHLO (with --decode) and as ONNX (batch 4 x the model's context),
runs them on the validation split's first windows (jax.export.deserialize and onnxruntime),
and compares with gpt_jax: the logits, and 32 tokens per row decoded greedily after a 16-token
prompt (StableHLO: prefill and decode_step; ONNX: the forward pass on the growing text) against
gpt_jax's decoder (what `gpt_jax.sample --temperature=0` runs). Prints one JSON line.
"""

import json
import os

from absl import app, flags
import jax
import numpy as np

from gpt_jax import checkpoint, data, decode, export
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.model import Transformer

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir in the GPT-2 layout (with or '
                                'without biases).')
_OUT = flags.DEFINE_string('out', 'runs/export_parity', 'Where the exports are written.')
BATCH, PROMPT, NEW = 4, 16, 32


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  cfg, params, _ = checkpoint.load_model(workdir)
  tokens = data.token_stream(config.data, tokenizer, workdir, config.data.val_split)
  windows = np.stack([tokens[i * cfg.max_len:(i + 1) * cfg.max_len] for i in range(BATCH)])
  windows = windows.astype(np.int32)
  reference = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, windows)[0])
  prompts = [list(map(int, row[:PROMPT])) for row in windows]
  greedy = decode.Generator(cfg, params, num_tokens=tokenizer.vocab_size).generate(
      prompts, NEW, temperature=0.0)
  result = {'workdir': workdir, 'batch': BATCH, 'max_len': cfg.max_len, 'new_tokens': NEW}

  hlo = os.path.join(_OUT.value, 'stablehlo')
  export.export(workdir, 'stablehlo', hlo, batch=BATCH, decode=True)
  load = lambda name: jax.export.deserialize(bytearray(open(
      os.path.join(hlo, f'{name}.jax_exported'), 'rb').read()))
  logits = np.asarray(load('forward').call(windows))
  result['stablehlo_max_abs_diff'] = float(np.abs(logits - reference).max())
  padded = np.zeros_like(windows)
  padded[:, :PROMPT] = windows[:, :PROMPT]
  lengths = np.full(BATCH, PROMPT, np.int32)
  step_logits, cache = load('prefill').call(padded, lengths)
  step, out = load('decode_step'), []
  for _ in range(NEW):
    next_tokens = np.argmax(np.asarray(step_logits)[:, :tokenizer.vocab_size], -1).astype(np.int32)
    out.append(next_tokens)
    step_logits, cache = step.call(next_tokens, lengths, cache)
    lengths = lengths + 1
  result['stablehlo_greedy_equal'] = np.array(out).T.tolist() == [list(g) for g in greedy]

  import onnxruntime  # pylint: disable=import-outside-toplevel
  onnx_dir = os.path.join(_OUT.value, 'onnx')
  export.export(workdir, 'onnx', onnx_dir, batch=BATCH)
  session = onnxruntime.InferenceSession(os.path.join(onnx_dir, 'forward.onnx'))
  logits = session.run(['logits'], {'tokens': windows.astype(np.int64)})[0]
  result['onnx_max_abs_diff'] = float(np.abs(logits - reference).max())
  rows = [list(p) for p in prompts]  # greedy by the whole forward pass (no cache in the graph)
  for _ in range(NEW):
    padded = np.zeros((BATCH, cfg.max_len), np.int64)
    for r, row in enumerate(rows):
      padded[r, :len(row)] = row
    step_logits = session.run(['logits'], {'tokens': padded})[0]
    for r, row in enumerate(rows):
      row.append(int(np.argmax(step_logits[r, len(row) - 1, :tokenizer.vocab_size])))
  result['onnx_greedy_equal'] = [row[PROMPT:] for row in rows] == [list(g) for g in greedy]
  result['logits_max_abs'] = float(np.abs(reference).max())
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
