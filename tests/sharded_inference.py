"""Samples, evaluates and serves one workdir on several meshes of the available devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_inference.py WORKDIR

Prints JSON: per mesh, greedy and sampled tokens, streamed tokens, the eval loss, the server's
completion text, the per-device and total parameter bytes, and the per-device bytes the rules
promise. Run by tests/test_sharded_inference.py in a subprocess (the device count is fixed when
jax starts).
"""

import json
import os
import sys

import jax
from fastapi import testclient

from gpt_jax import checkpoint, decode, eval as eval_lib, sharding
from gpt_jax.inference import server as server_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

MESHES = ['1x1x1', '1x1x8', '1x8x1', '2x2x2']
CHECKED_FULLY = ['1x1x1', '2x2x2']  # also streamed, evaluated and served


def promised_bytes(params) -> int:
  """Per-device bytes if every dimension splits over exactly the mesh axes of its sharding."""
  total = 0
  for leaf in jax.tree.leaves(params):
    parts = 1
    for axes in leaf.sharding.spec:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        parts *= leaf.sharding.mesh.shape[axis] if axis else 1
    total += leaf.size // parts * leaf.dtype.itemsize
  return total


def main(workdir):
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  prompts = [tokenizer.encode(text) for text in ('The ', 'In the beginning', 'A')]
  runs = {}
  for mesh in MESHES:
    placement = sharding.inference_placement(mesh, config.mesh)
    cfg, params, _ = checkpoint.load_model(workdir, None, placement)
    generator = decode.Generator(cfg, params, tokenizer.vocab_size, placement=placement)
    run = {
        'greedy': generator.generate(prompts, 16, temperature=0),
        'sampled': generator.generate(prompts, 16, temperature=1.0, seed=3, num_samples=2),
        'bytes_per_device': sharding.bytes_per_device(params),
        'promised_bytes': promised_bytes(params),
        'total_bytes': sum(x.nbytes for x in jax.tree.leaves(params)),
    }
    if mesh == '1x1x1':
      run['greedy_text'] = tokenizer.decode(run['greedy'][0])
    if mesh in CHECKED_FULLY:
      run['streamed'] = [[int(t) for t in step] for step in
                         generator.stream(prompts, 16, temperature=1.0, seed=3, num_samples=2)]
      del generator, params
      run['eval_loss'] = eval_lib.evaluate(workdir, batch_size=4, mesh=mesh)['loss']
      server = server_lib.load(workdir, slots=3, mesh=mesh)
      with testclient.TestClient(server_lib.create_app(server)) as client:
        reply = client.post('/v1/completions', json={
            'model': server.model_name, 'prompt': ['The ', 'A'], 'max_tokens': 16,
            'temperature': 1.0, 'seed': 5})
      run['served'] = [choice['text'] for choice in reply.json()['choices']]
      run['slots'] = server.engine.slots
      server.engine.stop()
    runs[mesh] = run
  try:
    sharding.check_heads_fit(8, 2, sharding.inference_placement('1x1x8', config.mesh))
    runs['kv_heads_error'] = None
  except ConfigError as e:
    runs['kv_heads_error'] = str(e)
  print(json.dumps(runs))


if __name__ == '__main__':
  main(sys.argv[1])
