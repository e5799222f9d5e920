r"""Export a gpt_jax workdir as a Hugging Face folder: GPT-2, Llama or Qwen2.

  python -m gpt_jax.convert.to_hf --workdir=runs/default --out=runs/default_hf
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('runs/default_hf')"

Writes `config.json` and `model.safetensors` (float32). A model in the GPT-2 layout (learned
positions, LayerNorm, GELU) becomes a `GPT2LMHeadModel` (Conv1D layout, plus `vocab.json` and
`merges.txt` when the workdir's tokenizer is GPT-2 BPE); one in the Llama layout (RoPE, RMSNorm,
SwiGLU, grouped-query attention, no biases) a `LlamaForCausalLM`, or a `Qwen2ForCausalLM` with
q/k/v biases (a converted Mistral comes back as the Llama it equals). Only the parameters of
the latest (or --step) checkpoint are read; a Hugging Face tokenizer (tokenizer.json and its
config) is written back as it was read. Other models are refused, naming the field at fault.
"""

import json
import os
import shutil

from absl import app, flags

from gpt_jax import checkpoint, cli
from gpt_jax.convert import gpt2
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import llama
from gpt_jax.errors import ConfigError
from gpt_jax.model import unstack_layers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A gpt_jax workdir (trained or converted).')
  flags.DEFINE_string('out', None, 'The Hugging Face folder to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def export(workdir: str, out: str, step: int | None = None) -> tuple[dict, str]:
  """Writes `out`; returns (its config.json as a dict, a note on the tokenizer)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir} is not a directory')
  model = dict(checkpoint.load_config(workdir).model)
  is_gpt2 = model['position'] == 'learned'
  if is_gpt2:
    gpt2.check_gpt2_layout(model)
  else:
    llama.check_layout(model)
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  tokenizer = tokenizer_lib.load(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
  model_cfg, params, _ = checkpoint.load_model(workdir, step)
  _, params = unstack_layers(model_cfg, params)  # a scan_layers model: one block_i per layer
  tensors = gpt2.params_to_hf(params, model) if is_gpt2 else llama.params_to_hf(params, model)

  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  eos_id = tokenizer.eos_id if tokenizer is not None else None
  if is_gpt2:
    hf_config = gpt2.hf_config_from_model(model, eos_id)
  else:
    hf_config = llama.hf_config_from_model(model, getattr(tokenizer, 'bos_id', None), eos_id)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  if is_gpt2 and isinstance(tokenizer, tokenizer_lib.GPT2BPETokenizer):
    for name in (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    note = 'GPT-2 BPE tokenizer: vocab.json + merges.txt'
  elif isinstance(tokenizer, tokenizer_lib.HuggingFaceTokenizer):
    for name, content in tokenizer.files.items():
      with open(os.path.join(out, name), 'wb') as f:
        f.write(content)
    note = f'its Hugging Face tokenizer: {", ".join(sorted(tokenizer.files))}'
  elif tokenizer is None:
    note = f'no tokenizer: {tokenizer_dir} does not exist'
  else:
    note = (f'weights only: the workdir\'s {type(tokenizer).__name__} has no Hugging Face '
            f'equivalent here; its files stay in {tokenizer_dir}')
  return hf_config, note


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  with cli.one_line_errors():
    if not FLAGS.workdir or not FLAGS.out:
      raise ConfigError('--workdir and --out are required')
    hf_config, note = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  layers = hf_config.get('n_layer', hf_config.get('num_hidden_layers'))
  width = hf_config.get('n_embd', hf_config.get('hidden_size'))
  print(f'Wrote {FLAGS.out}: {hf_config["architectures"][0]} ({layers} layers x {width}, '
        f'vocabulary {hf_config["vocab_size"]}); {note}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
