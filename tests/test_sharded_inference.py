"""sample, eval and serve on 8 simulated devices agree with one device, with parameters loaded
straight into their shards."""

import json
import subprocess
import sys

from conftest import REPO, TINY, module_env, run_module


def test_sharded_inference_matches_one_device(tmp_path, tfds_dir):
  workdir = str(tmp_path / 'run')
  overrides = dict(TINY, **{'model.num_heads': 8, 'model.scan_layers': True,
                            'train.num_steps': 5, 'train.eval_every': 0,
                            'data.tfds_data_dir': tfds_dir})
  run_module('gpt_jax.train', '--config=configs/default.py', f'--workdir={workdir}',
             *[f'--config.{k}={v}' for k, v in overrides.items()])
  # One subprocess for every mesh: the device count is fixed when jax starts.
  proc = subprocess.run([sys.executable, 'tests/sharded_inference.py', workdir], cwd=REPO,
                        env=module_env(devices=8, quick_compile=True), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.strip().splitlines()[-1])

  one = runs['1x1x1']
  assert len({token for row in one['sampled'] for token in row}) > 10  # tokens that vary
  for mesh in ('1x1x8', '1x8x1', '2x2x2'):
    assert runs[mesh]['greedy'] == one['greedy'], mesh
    assert runs[mesh]['sampled'] == one['sampled'], mesh
  sharded = runs['2x2x2']
  assert sharded['streamed'] == one['streamed']
  assert abs(sharded['eval_loss'] - one['eval_loss']) < 1e-5
  assert sharded['served'] == one['served'] and all(one['served'])
  assert sharded['slots'] == 4  # 3 asked for, rounded up to the 4 batch shards

  # Every parameter is split exactly as its sharding says, and most of the bytes are split.
  total = one['total_bytes']
  assert one['bytes_per_device'] == total
  for mesh, at_most in (('1x1x8', total / 6), ('1x8x1', total / 7), ('2x2x2', total / 3.5)):
    assert runs[mesh]['bytes_per_device'] == runs[mesh]['promised_bytes'], mesh
    assert runs[mesh]['bytes_per_device'] < at_most, (mesh, runs[mesh]['bytes_per_device'])
  assert runs['kv_heads_error'] == ("The model's 2 key/value heads do not divide over tensor=8 "
                                    'devices: choose a --mesh whose tensor size divides 2')

  # The binary: --mesh over 2 devices prints one device's greedy text.
  args = (f'--workdir={workdir}', '--prompt=The ', '--max_new_tokens=16', '--temperature=0')
  printed = run_module('gpt_jax.sample', *args, '--mesh=1x1x2', devices=2,
                       quick_compile=True).stdout
  assert printed == 'The ' + one['greedy_text'] + '\n'
  bad = run_module('gpt_jax.sample', *args, '--mesh=2x2', check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: --mesh must be DATAxFSDPxTENSOR sizes such as 1x1x8 or -1x1x2, got '2x2'")


