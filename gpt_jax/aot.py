r"""Compile a run's train step for a Cloud TPU slice on any host: memory, FLOPs, collectives.

  python -m gpt_jax.aot --config=configs/llama_1b.py --topology=v5p-8 \
      [--num_slices=2] [--config.data.batch_size=32 ...] [--max_batch] [--decode] [--json=FILE]

Needs libtpu (`pip install -e '.[tpu]'`), not a TPU. What is compiled and reported:
gpt_jax/tpu/plan.py. Exit status 1 when the step does not fit.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from gpt_jax import cli
from gpt_jax.tpu import topology as tpu
from gpt_jax.tpu import plan as tpu_plan

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Cloud TPU accelerator type (v4-N, v5e-N, '
                                'v5litepod-N, v5p-N, v6e-N) or a libtpu torus such as v5p:2x2x4.')
_NUM_SLICES = flags.DEFINE_integer('num_slices', None, 'Slices of that topology (multi-slice); '
                                   'default: config.mesh.num_slices.')
_MAX_BATCH = flags.DEFINE_bool('max_batch', False, 'Find the largest global batch that fits.')
_EVAL = flags.DEFINE_bool('eval', True, 'Also compile the eval step.')
_DECODE = flags.DEFINE_bool('decode', False, 'Also compile decoding (gpt_jax.sample\'s loop) '
                            'for one chip of the slice.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 8, 'Sequences decoded at once.')
_DECODE_PROMPT = flags.DEFINE_integer('decode_prompt_len', 128, 'Prompt tokens per sequence.')
_DECODE_NEW = flags.DEFINE_integer('decode_new_tokens', 256, 'Tokens generated per sequence.')
_JSON = flags.DEFINE_string('json', None, 'Write the report to this JSON file.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    raise app.UsageError('--config and --topology are required')
  cli.skip_absent_tpu()
  cli.quiet_logs()
  config = _CONFIG.value
  with cli.one_line_errors():
    topology = tpu.Slice.parse(_TOPOLOGY.value, _NUM_SLICES.value or config.mesh.num_slices)
    if _MAX_BATCH.value:
      batch, report = tpu_plan.max_batch(config, topology)
      report['max_global_batch'] = batch
      print(f'largest global batch that fits: {batch}' if batch else
            'not even one sequence per data shard fits')
    else:
      report = tpu_plan.compile_train(config, topology, with_eval=_EVAL.value)
    if _DECODE.value:
      report['decode'] = tpu_plan.compile_decode(config, topology, _DECODE_BATCH.value,
                                                   _DECODE_PROMPT.value, _DECODE_NEW.value)
  print(tpu_plan.summary(report), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
  if not report.get('fits', False):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
