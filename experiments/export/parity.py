r"""Parity of the exported programs with gpt_jax: max |logits difference| and greedy tokens.

  python experiments/export/parity.py --workdir=runs/shakespeare_char --out=runs/export_parity

Exports the workdir as StableHLO and as ONNX (both with --decode; batch 4 x the model's context),
runs them on the validation split's first windows (jax.export.deserialize and onnxruntime),
and compares with gpt_jax: the logits, and 32 tokens per row decoded greedily after a 16-token
prompt with prefill and decode_step (the KV cache passed along) against gpt_jax's decoder (what
`gpt_jax.sample --temperature=0` runs), and the ONNX decode steps' logits against gpt_jax's
forward pass over the same text. Prints one JSON line.
"""

import json
import os

from absl import app, flags
import jax
import numpy as np

from gpt_jax import checkpoint, data, decode
from gpt_jax.convert import export as exporting
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
  exporting.export(workdir, 'stablehlo', hlo, batch=BATCH, decode=True)
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
  manifest = exporting.export(workdir, 'onnx', onnx_dir, batch=BATCH, decode=True)
  session = {name: onnxruntime.InferenceSession(os.path.join(onnx_dir, f'{name}.onnx'))
             for name in manifest['functions']}
  logits = session['forward'].run(['logits'], {'tokens': windows.astype(np.int64)})[0]
  result['onnx_max_abs_diff'] = float(np.abs(logits - reference).max())
  # Greedy with the exported prefill and decode_step, the KV cache passed along.
  cache_names = [i['name'] for i in manifest['functions']['decode_step']['inputs'][2:]]
  padded = np.zeros((BATCH, cfg.max_len), np.int64)
  padded[:, :PROMPT] = windows[:, :PROMPT]
  lengths = np.full(BATCH, PROMPT, np.int64)
  step_logits, *cache = session['prefill'].run(None, {'tokens': padded, 'lengths': lengths})
  out, all_logits = [], []
  for _ in range(NEW):
    all_logits.append(step_logits)
    next_tokens = np.argmax(step_logits[:, :tokenizer.vocab_size], -1)
    out.append(next_tokens)
    step_logits, *cache = session['decode_step'].run(None, {
        'tokens': next_tokens, 'positions': lengths, **dict(zip(cache_names, cache))})
    lengths = lengths + 1
  result['onnx_greedy_equal'] = np.array(out).T.tolist() == [list(g) for g in greedy]
  # Each step's logits against gpt_jax's forward pass over the same text.
  text = np.concatenate([windows[:, :PROMPT], np.array(out).T], axis=1).astype(np.int32)
  full = np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, text)[0])
  decoded = np.stack(all_logits, axis=1)  # [batch, NEW, vocab]
  result['onnx_decode_max_abs_diff'] = float(np.abs(
      decoded - full[:, PROMPT - 1:PROMPT - 1 + NEW]).max())
  result['logits_max_abs'] = float(np.abs(reference).max())
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
