r"""Import a Hugging Face checkpoint from a local folder as a gpt_jax workdir.

  python -m gpt_jax.convert.from_hf --hf_dir=path/to/gpt2 --workdir=runs/gpt2
  python -m gpt_jax.sample --workdir=runs/gpt2 --prompt="Hello, I'm a language model,"

Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`, which needs torch) of a GPT-2 (`GPT2LMHeadModel`, any size) or a Llama-family
model (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`; gpt_jax/convert/llama.py),
and writes a workdir like a training run's: `config.json` (base config with the model fields
set), `tokenizer/` (GPT-2 BPE from `vocab.json` + `merges.txt`, or the folder's `tokenizer.json`
with its `tokenizer_config.json` and chat template) and `checkpoints/<step>/params`.
Nothing is downloaded. The workdir then serves `gpt_jax.sample`, `gpt_jax.eval`, and
`gpt_jax.train --config.init_from=<workdir>` (fine-tuning).

Safetensors are converted one tensor at a time, each placed straight into its sharding over all
devices (parameters split along `fsdp`), so host memory holds the converted parameters (float32)
plus one tensor and the file it is read from, not the checkpoint twice.
`--max_len` shortens the context (RoPE models have no positional weights; the KV cache of a
128k-token context is large).
"""

import json
import os
import shutil

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import checkpoint, cli, sharding
from gpt_jax.convert import gpt2
from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import llama
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('hf_dir', None, 'A local Hugging Face GPT-2 folder.')
  flags.DEFINE_string('workdir', None, 'The gpt_jax workdir to write (new or empty).')
  flags.DEFINE_integer('step', 0, 'Checkpoint step to write the parameters at.')
  flags.DEFINE_integer('max_len', None, "The model's context (RoPE models; default: the "
                       "folder's max_position_embeddings).")


def read_hf_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'--hf_dir {hf_dir} is not a directory')
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {hf_dir} a Hugging Face model folder?')
  with open(path) as f:
    return json.load(f)


def _safetensors_files(hf_dir: str) -> list[str] | None:
  """The folder's safetensors files (one, or the shards its index names); None if it has none."""
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  single = os.path.join(hf_dir, 'model.safetensors')
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      return sorted({os.path.join(hf_dir, v) for v in json.load(f)['weight_map'].values()})
  return None


def stream_tensors(hf_dir: str):
  """(HF name, numpy array in the file's dtype), one tensor at a time.

  Safetensors are memory-mapped, one file at a time; `pytorch_model.bin` (needs torch) is read
  whole.
  """
  files = _safetensors_files(hf_dir)
  if files is not None:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    for path in files:
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}, named by model.safetensors.index.json, is missing')
      with safe_open(path, framework='np') as f:
        for name in f.keys():
          yield name, f.get_tensor(name)
    return
  torch_bin = os.path.join(hf_dir, 'pytorch_model.bin')
  if not os.path.isfile(torch_bin):
    raise FileNotFoundError(f'No model.safetensors or pytorch_model.bin in {hf_dir}')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(f'Reading {torch_bin} needs torch (pip install torch), or save the '
                      'model as model.safetensors') from None
  state = torch.load(torch_bin, map_location='cpu', weights_only=True)
  while state:
    name, value = state.popitem()
    yield name, value.float().numpy()


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def param_shardings(model: dict):
  """(abstract params, their shardings): split along `fsdp` over every device."""
  cfg = ModelConfig(**model)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0),
                                                       jnp.zeros((1, 1), jnp.int32)))['params']
  abstract = nn.unbox(boxed)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh,
                                            sharding.LOGICAL_RULES)
  sharding.check_divisible(abstract, shardings)
  return abstract, shardings


def convert_tensors(hf_dir: str, model: dict, architecture: str) -> tuple[dict, dict]:
  """The parameters of a GPT-2 or Llama-family folder, read and placed one tensor at a time,
  and their checksums (checkpoint.fingerprint)."""
  layout = gpt2 if model['position'] == 'learned' else llama
  abstract, shardings = param_shardings(model)
  expected = layout.hf_shapes(model)
  params, checksums, seen = {}, {}, set()
  for name, value in stream_tensors(hf_dir):
    name = name.removeprefix('transformer.')  # GPT-2's
    if name.endswith(layout.BUFFER_SUFFIXES) or (name == 'lm_head.weight'
                                                 and model['tie_embeddings']):
      continue  # a tied head saved anyway is the embedding again
    if name not in expected:
      raise ConfigError(f'The checkpoint has weight {name}, which a {architecture} with its '
                        'config.json does not')
    if value.shape != expected[name]:
      raise ConfigError(f'Weight {name} has shape {value.shape}; config.json implies '
                        f'{expected[name]}')
    for path, param in layout.tensor_to_params(name, value, model):
      param = np.ascontiguousarray(param, _lookup(abstract, path).dtype)  # bf16: exact upcast
      for tree, leaf in ((params, jax.device_put(param, _lookup(shardings, path))),
                         (checksums, checkpoint.checksum_on_host(param))):
        for key in path[:-1]:
          tree = tree.setdefault(key, {})
        tree[path[-1]] = leaf
      del param
    seen.add(name)
    del value
  missing = sorted(set(expected) - seen)
  if missing:
    raise ConfigError(f'The checkpoint lacks {len(missing)} weights of a {architecture} with '
                      f'its config.json, e.g. {missing[0]}')
  return params, checksums


def read_tokenizer(hf_dir: str, gpt2: bool) -> tokenizer_lib.Tokenizer | None:
  """GPT-2 BPE (vocab.json + merges.txt) for a GPT-2, else the folder's tokenizer.json (with
  tokenizer_config.json and its chat template), if any."""
  if gpt2 and all(os.path.isfile(os.path.join(hf_dir, f))
                  for f in (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE)):
    return tokenizer_lib.GPT2BPETokenizer.from_files(hf_dir)
  if os.path.isfile(os.path.join(hf_dir, tokenizer_lib.HF_TOKENIZER_FILE)):
    return tokenizer_lib.HuggingFaceTokenizer.from_directory(hf_dir)
  return None


def model_fields(hf_config: dict) -> dict:
  """config.model fields for a supported config.json; ConfigError naming what is not."""
  if llama.is_llama_family(hf_config):
    return llama.model_fields_from_hf(hf_config)
  if hf_config.get('model_type') == 'gpt2':
    return gpt2.model_fields_from_hf(hf_config)
  raise ConfigError(f'config.json has model_type {hf_config.get("model_type")!r}; gpt_jax '
                    f'converts gpt2, {", ".join(llama.ARCHITECTURES)}')


def convert_checkpoint(hf_dir: str, workdir: str, step: int = 0, max_len: int | None = None):
  """Writes the workdir; returns (config, params, tokenizer or None)."""
  hf_config = read_hf_config(hf_dir)
  model = model_fields(hf_config)
  if max_len:
    if model['position'] != 'rope':
      raise ConfigError('--max_len shortens RoPE models only: GPT-2 has a position embedding '
                        f'of {model["max_len"]} rows')
    model['max_len'] = max_len
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
    raise ConfigError(f'{workdir} already holds checkpoints; give an empty --workdir')
  architecture = llama.ARCHITECTURES.get(hf_config['model_type'], 'GPT2LMHeadModel')
  params, checksums = convert_tensors(hf_dir, model, architecture)

  tokenizer = read_tokenizer(hf_dir, gpt2=model['position'] == 'learned')
  if tokenizer is not None and tokenizer.vocab_size > model['vocab_size']:
    raise ConfigError(f'The tokenizer of {hf_dir} has {tokenizer.vocab_size} tokens, more than '
                      f'the model\'s vocab_size {model["vocab_size"]}')

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
  # A few arrays written at a time (Orbax copies each while writing it; its limit must exceed
  # the largest array): peak memory stays near one copy of the parameters.
  checkpoint.save_params(workdir, step, params,
                         bytes_in_flight=2 * max(x.nbytes for x in jax.tree.leaves(params)),
                         checksums=checksums)
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
    config, params, tokenizer = convert_checkpoint(FLAGS.hf_dir, FLAGS.workdir, FLAGS.step,
                                                   FLAGS.max_len)
  n = sum(x.size for x in jax.tree.leaves(params))
  m = config.model
  kind = 'GPT-2' if m.position == 'learned' else 'Llama-layout model'
  print(f'Wrote {FLAGS.workdir}: {kind} with {n / 1e6:.1f}M parameters ({m.num_layers} layers x '
        f'{m.emb_dim}, {m.num_heads} heads ({m.num_kv_heads or m.num_heads} kv), context '
        f'{m.max_len}, vocabulary {m.vocab_size}) at step {FLAGS.step}')
  if tokenizer is None:
    print(f'note: {FLAGS.hf_dir} has no tokenizer.json (nor vocab.json + merges.txt), so the '
          'workdir has no tokenizer/; gpt_jax.sample and gpt_jax.eval need one (copy a '
          'tokenizer/ in).')
  elif getattr(tokenizer, 'chat_template', None):
    print('The tokenizer has a chat template: gpt_jax.chat, gpt_jax.serve and gpt_jax.finetune '
          'use it.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
