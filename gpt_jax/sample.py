r"""Generate text from a trained workdir.

  python -m gpt_jax.sample --workdir=runs/default --prompt="The " --max_new_tokens=200 \
      --temperature=0.8 --top_k=50 --seed=0

Rebuilds the model from the workdir's config.json and tokenizer, restores only the parameters
(no optimizer state) of the latest checkpoint, and decodes with a KV cache. Temperature 0 is
greedy decoding.
"""

import os
import sys

from absl import app, flags, logging

from gpt_jax import checkpoint, decode, tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir written by gpt_jax.train.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue ("" starts from end-of-text).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1.0: off).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Independent samples of the prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  sampling = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                  seed=_SEED.value)
  try:
    model_cfg, params, _ = checkpoint.load_model(_WORKDIR.value, _STEP.value)
    tokenizer = tokenizer_lib.load(os.path.join(_WORKDIR.value, 'tokenizer'))
    prompt = decode.encode_prompt(tokenizer, _PROMPT.value)
    generator = decode.Generator(model_cfg, params)
    if _NUM_SAMPLES.value == 1:
      stream_one(generator, tokenizer, prompt, _MAX_NEW_TOKENS.value, sampling)
    else:
      completions = generator.generate([prompt] * _NUM_SAMPLES.value, _MAX_NEW_TOKENS.value,
                                       eos_id=tokenizer.eos_id, **sampling)
      for i, completion in enumerate(completions):
        print(f'--- sample {i} ---\n{_PROMPT.value}{tokenizer.decode(completion)}')
  except (ConfigError, FileNotFoundError) as e:  # e.g. a prompt longer than the context
    sys.exit(f'error: {e}')


def stream_one(generator, tokenizer, prompt, max_new_tokens, sampling):
  """Prints the continuation as it is generated (whole characters only)."""
  sys.stdout.write(_PROMPT.value)
  tokens, printed = [], ''
  for (token,) in generator.stream([prompt], max_new_tokens, **sampling):
    if token == tokenizer.eos_id:
      break
    tokens.append(int(token))
    text = tokenizer.decode(tokens)
    # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
    if not text.endswith('\ufffd'):
      sys.stdout.write(text[len(printed):])
      sys.stdout.flush()
      printed = text
  sys.stdout.write(tokenizer.decode(tokens)[len(printed):] + '\n')


if __name__ == '__main__':
  app.run(main)
