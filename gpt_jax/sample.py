r"""Generate text from a workdir (trained, or converted from Hugging Face).

  python -m gpt_jax.sample --workdir=runs/default --prompt="The " --max_new_tokens=100 \
      --temperature=0.8 --top_k=50 --top_p=0.95 --repetition_penalty=1.1 --seed=0
  python -m gpt_jax.sample --workdir=runs/default --prompt="The " --prompt="In Python, " \
      --num_samples=2 --stop='\n\n'

Rebuilds the model from the workdir's config.json and tokenizer, restores only the parameters
(no optimizer state) of the latest checkpoint, and decodes with a KV cache. Temperature 0 is
greedy decoding. One sample streams to the terminal as it is generated (whole characters
only); several prompts (repeat --prompt) and --num_samples each decode together in one batch.
A sample ends at end-of-text, at --max_new_tokens, or before a --stop string.
"""

import codecs
import os
import sys

from absl import app, flags, logging

from gpt_jax import checkpoint, cli, decode, sharding, tokenizer as tokenizer_lib
from gpt_jax.inference import quantize
from gpt_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A workdir written by gpt_jax.train or convert.from_hf.')
  flags.DEFINE_multi_string('prompt', [''], 'Text to continue ("": from end-of-text); repeat '
                            'the flag for a batch of prompts.')
  flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate per sample.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass, in (0, 1] (1.0: off).')
  flags.DEFINE_float('repetition_penalty', 1.0, 'Penalise tokens already in the text (> 1 '
                     'discourages repeats, as Hugging Face; 1.0: off).')
  flags.DEFINE_integer('num_samples', 1, 'Independent samples of each prompt.')
  flags.DEFINE_multi_string('stop', [], 'End a sample before this text (repeatable; escapes '
                            'such as \\n are read).')
  flags.DEFINE_bool('truncate_prompt', False, 'Drop the start of a prompt that does not fit the '
                    'context with --max_new_tokens, instead of an error.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_enum('quantize', 'none', quantize.MODES, quantize.MODES_HELP)
  cli.define_mesh_flag()


def check_flags(f) -> None:
  """ConfigError naming the first flag out of range (before anything is loaded)."""
  if f.num_samples <= 0:
    raise ConfigError(f'--num_samples must be positive, got {f.num_samples}')
  cli.check_generation_flags(f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs(logging.ERROR)
  with cli.one_line_errors():  # e.g. a prompt longer than the context
    check_flags(FLAGS)
    config = checkpoint.load_config(FLAGS.workdir)  # a clear error before the tokenizer's
    tokenizer = tokenizer_lib.load(os.path.join(FLAGS.workdir, 'tokenizer'))
    placement = sharding.inference_placement(FLAGS.mesh, config.mesh)
    model_cfg, params, _ = checkpoint.load_model(FLAGS.workdir, FLAGS.step, placement)
    generator = quantize.generator(model_cfg, quantize.apply(params, FLAGS.quantize),
                                   tokenizer.vocab_size, placement=placement)
    stop = [codecs.decode(s.encode('latin-1', 'backslashreplace'), 'unicode_escape')
            for s in FLAGS.stop]
    prompts = FLAGS.prompt
    pieces = decode.stream_text(
        generator, tokenizer, prompts, FLAGS.max_new_tokens, stop=stop,
        num_samples=FLAGS.num_samples, truncate=FLAGS.truncate_prompt, seed=FLAGS.seed,
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        repetition_penalty=FLAGS.repetition_penalty)
    if len(prompts) * FLAGS.num_samples == 1:
      sys.stdout.write(prompts[0])
      for _, piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
      sys.stdout.write('\n')
    else:
      texts = [''] * (len(prompts) * FLAGS.num_samples)
      for row, piece in pieces:
        texts[row] += piece
      for row, text in enumerate(texts):
        print(f'--- sample {row} ---\n{prompts[row // FLAGS.num_samples]}{text}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
