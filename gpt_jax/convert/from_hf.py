r"""Import a Hugging Face GPT-2 checkpoint from a local folder as a gpt_jax workdir.

  python -m gpt_jax.convert.from_hf --hf_dir=path/to/gpt2 --workdir=runs/gpt2
  python -m gpt_jax.sample --workdir=runs/gpt2 --prompt="Hello, I'm a language model,"

Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`, which needs torch) — any GPT-2 size, in GPT-2's Conv1D layout — and writes
a workdir like a training run's: `config.json` (base config with the model fields set),
`tokenizer/` (GPT-2 BPE, when the folder has `vocab.json` + `merges.txt`) and
`checkpoints/<step>/params`. Nothing is downloaded. The workdir then serves `gpt_jax.sample`,
`gpt_jax.eval`, and `gpt_jax.train --config.init_from=<workdir>` (fine-tuning).
"""

import json
import os
import shutil

from absl import app, flags
import jax
import numpy as np

from gpt_jax import checkpoint, cli, convert
from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('hf_dir', None, 'A local Hugging Face GPT-2 folder.')
  flags.DEFINE_string('workdir', None, 'The gpt_jax workdir to write (new or empty).')
  flags.DEFINE_integer('step', 0, 'Checkpoint step to write the parameters at.')

# Buffers that old transformers versions saved with the weights (the causal mask).
_BUFFER_SUFFIXES = ('.attn.bias', '.attn.masked_bias')


def read_hf_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'--hf_dir {hf_dir} is not a directory')
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {hf_dir} a Hugging Face model folder?')
  with open(path) as f:
    return json.load(f)


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Float32 arrays by HF name, without the `transformer.` prefix and without buffers."""
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  single = os.path.join(hf_dir, 'model.safetensors')
  torch_bin = os.path.join(hf_dir, 'pytorch_model.bin')
  if os.path.isfile(single) or os.path.isfile(index):
    from safetensors.numpy import load_file
    if os.path.isfile(single):
      files = [single]
    else:
      with open(index) as f:
        files = sorted({os.path.join(hf_dir, v) for v in json.load(f)['weight_map'].values()})
    raw = {}
    for path in files:
      raw.update(load_file(path))
  elif os.path.isfile(torch_bin):
    try:
      import torch
    except ImportError:
      raise ConfigError(f'Reading {torch_bin} needs torch (pip install torch), or save the '
                        'model as model.safetensors') from None
    state = torch.load(torch_bin, map_location='cpu', weights_only=True)
    raw = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f'No model.safetensors or pytorch_model.bin in {hf_dir}')
  tensors = {}
  for name, value in raw.items():
    name = name.removeprefix('transformer.')
    if not name.endswith(_BUFFER_SUFFIXES):
      tensors[name] = np.asarray(value, np.float32)  # bf16/fp16 checkpoints: exact upcast
  return tensors


def _check_tensors(tensors: dict, model: dict) -> None:
  """Every weight there with GPT-2's shape for this config, and nothing unexpected."""
  expected = convert.hf_shapes(model)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ConfigError(f'The checkpoint lacks {len(missing)} GPT-2 weights for its config.json, '
                      f'e.g. {missing[0]}')
  for name, shape in expected.items():
    if tensors[name].shape != shape:
      raise ConfigError(f'Weight {name} has shape {tensors[name].shape}; config.json implies '
                        f'{shape}')
  unexpected = sorted(set(tensors) - set(expected) - {'lm_head.weight'})
  if unexpected:
    raise ConfigError(f'The checkpoint has weights a GPT-2 does not: {unexpected[:3]}')


def convert_checkpoint(hf_dir: str, workdir: str, step: int = 0):
  """Writes the workdir; returns (config, params)."""
  hf_config = read_hf_config(hf_dir)
  model = convert.model_fields_from_hf(hf_config)
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
    raise ConfigError(f'{workdir} already holds checkpoints; give an empty --workdir')
  tensors = read_tensors(hf_dir)
  if not model['tie_embeddings'] and 'lm_head.weight' not in tensors:
    raise ConfigError('config.json has tie_word_embeddings=false but the checkpoint has no '
                      'lm_head.weight')
  _check_tensors(tensors, model)
  params = jax.tree.map(np.ascontiguousarray, convert.hf_to_params(tensors, model))
  del tensors

  tokenizer = None
  if all(os.path.isfile(os.path.join(hf_dir, f))
         for f in (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE)):
    tokenizer = tokenizer_lib.GPT2BPETokenizer.from_files(hf_dir)
    if tokenizer.vocab_size > model['vocab_size']:
      raise ConfigError(f'vocab.json has {tokenizer.vocab_size} tokens, more than the model\'s '
                        f'vocab_size {model["vocab_size"]}')

  config = config_lib.base_config()
  config.model.update(model)
  config.data.seq_len = model['max_len']
  config.train.sample_prompt = ''
  os.makedirs(workdir, exist_ok=True)
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  if tokenizer is not None:
    if os.path.isdir(tokenizer_dir):
      shutil.rmtree(tokenizer_dir)
    tokenizer.save(tokenizer_dir)
  checkpoint.save_params(workdir, step, params)
  checkpoint.save_config(workdir, config)  # last: a workdir with a config is complete
  with open(os.path.join(workdir, 'converted_from.json'), 'w') as f:
    json.dump({'hf_dir': os.path.abspath(hf_dir), 'hf_config': hf_config}, f, indent=2)
  return config, params, tokenizer


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors():
    if not FLAGS.hf_dir or not FLAGS.workdir:
      raise ConfigError('--hf_dir and --workdir are required')
    config, params, tokenizer = convert_checkpoint(FLAGS.hf_dir, FLAGS.workdir, FLAGS.step)
  n = sum(x.size for x in jax.tree.leaves(params))
  m = config.model
  print(f'Wrote {FLAGS.workdir}: GPT-2 with {n / 1e6:.1f}M parameters ({m.num_layers} layers x '
        f'{m.emb_dim}, {m.num_heads} heads, context {m.max_len}, vocabulary {m.vocab_size}) '
        f'at step {FLAGS.step}')
  if tokenizer is None:
    print(f'note: {FLAGS.hf_dir} has no vocab.json + merges.txt, so the workdir has no '
          'tokenizer/; gpt_jax.sample and gpt_jax.eval need one (copy a tokenizer/ in).')


if __name__ == '__main__':
  define_flags()
  app.run(main)
