"""Every mesh shape of 8 simulated devices trains exactly like one device, sharded as the rules say."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, module_env

# What gpt_jax.sharding.LOGICAL_RULES promise for each kind of parameter.
EXPECTED_SPECS = {
    "['wte']['embedding']": ['tensor', 'fsdp'],       # (vocab, embed)
    "['wpe']": [None, 'fsdp'],                        # (position, embed)
    "['block_0']['attn']['query']['kernel']": ['fsdp', 'tensor', None],  # (embed, heads, head_dim)
    "['block_0']['attn']['key']['bias']": ['tensor', None],
    "['block_0']['attn']['out']['kernel']": ['tensor', None, 'fsdp'],    # (heads, head_dim, embed)
    "['block_1']['mlp']['fc_in']['kernel']": ['fsdp', 'tensor'],         # (embed, mlp)
    "['block_1']['mlp']['fc_out']['kernel']": ['tensor', 'fsdp'],        # (mlp, embed)
    "['block_1']['ln_2']['scale']": [None],
    "['ln_f']['bias']": [None],
}


@pytest.fixture(scope='module')
def results(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('meshes'))
  proc = subprocess.run([sys.executable, 'tests/sharded_steps.py', workdir, tfds_dir], cwd=REPO,
                        env=module_env(devices=8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh', ['8x1x1', '1x8x1', '2x4x1', '2x2x2', '1x2x4', '1x1x8',
                                  '1x8x1-muon', '2x2x2-muon'])
def test_mesh_matches_one_device(results, mesh):
  workdir, runs = results
  one_device = '1x1x1-muon' if mesh.endswith('-muon') else '1x1x1'
  np.testing.assert_allclose(runs[mesh]['losses'], runs[one_device]['losses'], rtol=1e-5)
  reference = np.load(os.path.join(workdir, f'{one_device}.npz'))
  params = np.load(os.path.join(workdir, f'{mesh}.npz'))
  assert sorted(params) == sorted(reference)
  for name in reference:
    # atol: Adam divides by sqrt(v), so float32 rounding in a near-zero gradient moves a
    # near-zero parameter by ~1e-6 however the devices split the sums.
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-5, atol=1e-5, err_msg=name)
  for name, spec in EXPECTED_SPECS.items():
    assert runs[mesh]['specs'][name] == spec, name
  assert runs[mesh]['opt_specs_match']  # Adam moments are sharded like their parameters


def test_fsdp_shards_parameters_and_optimizer_state(results):
  _, runs = results
  fsdp = runs['1x8x1']
  ratio = fsdp['bytes_per_device'] / fsdp['bytes_total']
  assert 1 / 8 <= ratio < 0.14, ratio  # 1/8, plus the small replicated norm parameters
  assert runs['8x1x1']['bytes_per_device'] == runs['8x1x1']['bytes_total']  # pure data parallel


def test_muon_runs_train(results):
  _, runs = results  # the Muon rows above trained (at the full rate from step 1), unlike AdamW's
  muon, adamw = runs['1x1x1-muon']['losses'], runs['1x1x1']['losses']  # (still in warmup)
  assert muon[0] == pytest.approx(adamw[0])  # the same initial parameters and batch
  assert muon[-1] < muon[0] - 0.1 and abs(adamw[-1] - adamw[0]) < 0.01, (muon, adamw)
