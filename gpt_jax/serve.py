r"""Serve a workdir over an OpenAI-compatible HTTP API (gpt_jax/inference/server.py).

  python -m gpt_jax.serve --workdir=runs/default --host=127.0.0.1 --port=8000 [--quantize=int8] \
      [--api_key=...] [--slots=16] [--max_queue=1024] [--request_timeout=600] [--mesh=DxFxT]
"""

import os
import sys

from absl import app, flags, logging

from gpt_jax import cli
from gpt_jax.errors import ConfigError
from gpt_jax.inference import quantize

FLAGS = flags.FLAGS
API_KEY_ENV = 'GPT_JAX_API_KEY'
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A workdir written by gpt_jax.train, finetune or '
                      'convert.from_hf.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('model_name', '', 'The model id clients send (default: the workdir\'s '
                      'folder name).')
  flags.DEFINE_enum('quantize', 'none', quantize.MODES, quantize.MODES_HELP)
  flags.DEFINE_integer('slots', 16, 'Sequences decoded together (KV cache rows).')
  flags.DEFINE_integer('max_queue', 1024, 'Choices (n per prompt of a request) that may wait '
                       'for a slot; a request beyond that gets 429 with Retry-After.')
  flags.DEFINE_float('request_timeout', 600, 'Seconds a request may wait and run before it is '
                     'ended with an error and its slots freed (0: no limit).')
  flags.DEFINE_string('api_key', None, 'Require `Authorization: Bearer <key>` on every endpoint '
                      f'but /health (default: ${API_KEY_ENV}, if set; prefer it: a flag shows in '
                      'the process list).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  cli.define_mesh_flag()


# -------------------------------------------------------------------- errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs(logging.ERROR)
  with cli.one_line_errors():
    # The [serve] extra's libraries: a missing one is a one-line error here.
    import uvicorn  # pylint: disable=import-outside-toplevel
    from gpt_jax.inference import server as server_lib  # pylint: disable=import-outside-toplevel
    if not FLAGS.workdir:
      raise ConfigError('--workdir is required')
    api_key = FLAGS.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and FLAGS.host not in LOCAL_HOSTS:
      print(f'warning: serving on {FLAGS.host} without an API key: anyone who can reach port '
            f'{FLAGS.port} can use the model (set {API_KEY_ENV} or --api_key).', file=sys.stderr,
            flush=True)
    server = server_lib.load(FLAGS.workdir, FLAGS.quantize, FLAGS.slots, FLAGS.step,
                             FLAGS.model_name, FLAGS.max_queue, FLAGS.request_timeout,
                             FLAGS.mesh)
  print(f"Serving '{server.model_name}' ({server.engine.slots} slots, context {server.context}, "
        f"quantize={FLAGS.quantize}, chat={'yes' if server.chat else 'no'}, "
        f"API key {'required' if api_key else 'not required'}) on "
        f'http://{FLAGS.host}:{FLAGS.port}/v1', flush=True)
  uvicorn.run(server_lib.create_app(server, api_key), host=FLAGS.host, port=FLAGS.port,
              log_level='warning')
  server.engine.stop()


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
