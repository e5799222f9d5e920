r"""Export a gpt_jax workdir in the GPT-2 layout as a Hugging Face GPT-2 folder.

  python -m gpt_jax.convert.to_hf --workdir=runs/default --out=runs/default_hf
  python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('runs/default_hf')"

Writes `config.json` and `model.safetensors` (float32, GPT-2's Conv1D layout), plus `vocab.json`
and `merges.txt` when the workdir's tokenizer is GPT-2 BPE. Only the parameters of the latest
(or --step) checkpoint are read. A model outside the GPT-2 layout (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases) is refused: transformers' GPT2LMHeadModel cannot express it.
"""

import json
import os
import shutil

from absl import app, flags

from gpt_jax import checkpoint, cli, convert
from gpt_jax import tokenizer as tokenizer_lib
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
  convert.check_gpt2_layout(model)
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  tokenizer = tokenizer_lib.load(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
  model_cfg, params, _ = checkpoint.load_model(workdir, step)
  _, params = unstack_layers(model_cfg, params)  # a scan_layers model: one block_i per layer
  tensors = convert.params_to_hf(params, model)

  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  eos_id = tokenizer.eos_id if tokenizer is not None else None
  hf_config = convert.hf_config_from_model(model, eos_id)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  if isinstance(tokenizer, tokenizer_lib.GPT2BPETokenizer):
    for name in (tokenizer_lib.GPT2_VOCAB_FILE, tokenizer_lib.GPT2_MERGES_FILE):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    note = 'GPT-2 BPE tokenizer: vocab.json + merges.txt'
  elif tokenizer is None:
    note = f'no tokenizer: {tokenizer_dir} does not exist'
  else:
    note = (f'weights only: the workdir\'s {type(tokenizer).__name__} has no Hugging Face GPT-2 '
            f'equivalent; its files stay in {tokenizer_dir}')
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
  print(f'Wrote {FLAGS.out}: GPT2LMHeadModel ({hf_config["n_layer"]} layers x '
        f'{hf_config["n_embd"]}, vocabulary {hf_config["vocab_size"]}); {note}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
