r"""Resume on another topology: written by 2 processes x 4 devices, resumed by 1 x 8 and by 1 x 4.

  python experiments/kill_resume/topology.py

A tiny byte-level config (1 layer x 32, global batch 8, checkpoints every 10 steps) trains 10
steps in 2 processes of 4 simulated CPU devices (jax.distributed on 127.0.0.1, mesh data=8);
copies of that workdir then resume to step 20 in 1 process of 8 devices (mesh data=8) and in 1
process of 4 devices (data=2, fsdp=2: another mesh shape too). The reference trains all 20
steps uninterrupted in 1 process of 8 devices. Printed: per resumed run, whether it logged the
same steps, the largest relative difference of its per-step losses from the reference's, and
the largest absolute difference of its final parameters.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np

from multihost import finish, losses, params  # this folder's helpers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare.txt')
OVERRIDES = {
    'model.num_layers': 1, 'model.emb_dim': 32, 'model.num_heads': 2, 'model.mlp_dim': 64,
    'model.vocab_size': 264, 'model.max_len': 32, 'data.tokenizer': 'byte', 'data.tfds_name': '',
    'data.seq_len': 32, 'data.batch_size': 8, 'train.log_every': 1, 'train.eval_every': 0,
    'checkpoint.every_steps': 10, 'optim.decay_steps': 20, 'train.progress_bar': False,
    'train.sample_tokens': 0,
}


def command(workdir, steps, mesh):
  flags = {**OVERRIDES, 'data.text_files': TEXT, 'train.num_steps': steps, **mesh}
  return [sys.executable, '-m', 'gpt_jax.train', '--config=configs/default.py',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in flags.items()]


def run(args, devices, extra=()):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen(list(args) + list(extra), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main():
  root = tempfile.mkdtemp(prefix='topology_')
  written, reference = os.path.join(root, 'written'), os.path.join(root, 'reference')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  finish([run(command(written, 10, {'mesh.data': 8}), 4,
              [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
               f'--process_id={i}']) for i in range(2)])
  finish([run(command(reference, 20, {'mesh.data': 8}), 8)])
  print(f'written by 2 processes x 4 devices: steps 1-{max(losses(written))}')
  for devices, mesh in ((8, {'mesh.data': 8}), (4, {'mesh.data': 2, 'mesh.fsdp': 2})):
    resumed = os.path.join(root, f'resumed_{devices}')
    shutil.copytree(written, resumed)
    finish([run(command(resumed, 20, mesh), devices)])
    got, want = losses(resumed), losses(reference)
    loss_diff = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params(resumed),
                                                                     params(reference)))
    print(f'resumed by 1 process x {devices} devices ({mesh}): same steps logged '
          f'{sorted(got) == sorted(want)}, per-step losses within {loss_diff:.1e} (relative) '
          f'of the uninterrupted run, final parameters within {param_diff:.1e}')


if __name__ == '__main__':
  main()
