r"""Peak host memory of converting a sharded Llama checkpoint, against the same conversion with
Orbax's default writing (every array at once) and the fingerprint computed as for training.

  python experiments/convert_memory/measure.py [--layers=16] [--devices=1,2]

Writes a random float32 LlamaForCausalLM folder (hidden 512, 4096 tokens, shards of ~24 MB),
then converts it in fresh processes and prints each one's peak resident memory above what it
held before converting (after its imports), as a multiple of the checkpoint's size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONVERT = r'''
import json, sys
import jax
from gpt_jax import checkpoint
from gpt_jax.convert import from_hf

if sys.argv[3] == 'reference':  # Orbax's defaults; the fingerprint of the placed arrays
  save_params = checkpoint.save_params
  checkpoint.save_params = lambda workdir, step, params, **_: save_params(workdir, step, params)

def status(field):
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**10

jax.devices()
before = status('VmRSS')
from_hf.convert_checkpoint(sys.argv[1], sys.argv[2])
print(json.dumps({'before_mib': before, 'peak_mib': status('VmHWM')}))
'''


def write_folder(directory: str, layers: int) -> float:
  """A sharded float32 Llama folder; returns its weights' size in MiB."""
  from safetensors.numpy import save_file
  from gpt_jax.convert import llama
  hf = dict(model_type='llama', vocab_size=4096, hidden_size=512, intermediate_size=1536,
            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f)
  rng = np.random.default_rng(0)
  shards, shard, total = [], {}, 0
  for name, shape in llama.hf_shapes(llama.model_fields_from_hf(hf)).items():
    shard[name] = rng.standard_normal(shape, np.float32)
    total += shard[name].nbytes
    if sum(x.nbytes for x in shard.values()) > 24e6:
      shards.append(shard)
      shard = {}
  shards.append(shard)
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(directory, file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(shard, file))
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'weight_map': weight_map}, f)
  return total / 2**20


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--devices', default='1,2')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, 'hf')
    os.makedirs(hf_dir)
    weights = write_folder(hf_dir, args.layers)
    print(f'checkpoint: {weights:.0f} MiB float32 in {len(os.listdir(hf_dir)) - 2} files')
    print('devices  conversion   peak above start (MiB)  / checkpoint')
    for devices in map(int, args.devices.split(',')):
      for mode in ('reference', 'gpt_jax'):
        env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
                   XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
        out = os.path.join(tmp, f'out_{devices}_{mode}')
        proc = subprocess.run([sys.executable, '-c', CONVERT, hf_dir, out, mode], env=env,
                              capture_output=True, text=True, check=True)
        memory = json.loads(proc.stdout.strip().splitlines()[-1])
        above = memory['peak_mib'] - memory['before_mib']
        print(f'{devices:7d}  {mode:10s}   {above:22.0f}  {above / weights:12.2f}x')


if __name__ == '__main__':
  main()
