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


MESHES = ['8x1x1', '1x8x1', '2x4x1', '2x2x2', '1x2x4', '1x1x8', '1x8x1-muon', '2x2x2-muon',
          '2x2x2-bf16']


def test_every_mesh_trains_like_one_device_sharded_as_the_rules_say(tmp_path, tfds_dir):
  # One test, not one per mesh: under pytest-xdist every worker that ran a test of this module
  # ran the 8-device subprocess (2.5 minutes) again.
  proc = subprocess.run([sys.executable, 'tests/sharded_steps.py', str(tmp_path), tfds_dir],
                        cwd=REPO, env=module_env(devices=8, quick_compile=True),
                        capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.strip().splitlines()[-1])
  for mesh in MESHES:
    _check_mesh_matches_one_device(str(tmp_path), runs, mesh)
  _check_fsdp_shards_parameters_and_optimizer_state(runs)
  _check_muon_trains(runs)


def _check_mesh_matches_one_device(workdir, runs, mesh):
  _, dash, variant = mesh.partition('-')
  one_device = '1x1x1' + dash + variant  # the same variant ('-muon', '-bf16') on one device
  if mesh.endswith('-bf16'):
    # bf16 products round their outputs, so sums split across devices round differently, and
    # Adam turns those roundings in near-zero gradients into whole-size steps: compare the
    # losses of 5 full-learning-rate steps (they fall by ~0.17) rather than the parameters.
    losses = runs[mesh]['losses']
    np.testing.assert_allclose(losses, runs[one_device]['losses'], rtol=1e-4, err_msg=mesh)
    assert losses[-1] < losses[0] - 0.1, losses
    return
  np.testing.assert_allclose(runs[mesh]['losses'], runs[one_device]['losses'], rtol=1e-5,
                             err_msg=mesh)
  reference = np.load(os.path.join(workdir, f'{one_device}.npz'))
  params = np.load(os.path.join(workdir, f'{mesh}.npz'))
  assert sorted(params) == sorted(reference), mesh
  for name in reference:
    # atol: Adam divides by sqrt(v), so float32 rounding in a near-zero gradient moves a
    # near-zero parameter by ~1e-6 however the devices split the sums.
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-5, atol=1e-5,
                               err_msg=f'{mesh}: {name}')
  for name, spec in EXPECTED_SPECS.items():
    assert runs[mesh]['specs'][name] == spec, (mesh, name)
  assert runs[mesh]['opt_specs_match'], mesh  # Adam moments are sharded like their parameters


def _check_fsdp_shards_parameters_and_optimizer_state(runs):
  fsdp = runs['1x8x1']
  ratio = fsdp['bytes_per_device'] / fsdp['bytes_total']
  assert 1 / 8 <= ratio < 0.14, ratio  # 1/8, plus the small replicated norm parameters
  assert runs['8x1x1']['bytes_per_device'] == runs['8x1x1']['bytes_total']  # pure data parallel


def _check_muon_trains(runs):
  # The Muon rows trained at the full rate from step 1, unlike AdamW's (still in warmup).
  muon, adamw = runs['1x1x1-muon']['losses'], runs['1x1x1']['losses']
  assert muon[0] == pytest.approx(adamw[0])  # the same initial parameters and batch
  assert muon[-1] < muon[0] - 0.1 and abs(adamw[-1] - adamw[0]) < 0.01, (muon, adamw)
