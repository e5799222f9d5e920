"""Shared helpers: run the real binaries in subprocesses, with a TFDS data dir per test session."""

import json
import os
import subprocess
import sys

import pytest

# The tests compute on the CPU, also where libtpu is installed (tests/test_aot.py compiles for
# TPUs with it); set before any test imports jax.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')

# Small enough to compile and train in seconds on 2 CPU cores.
TINY = {
    'model.num_layers': 2, 'model.num_heads': 4, 'model.emb_dim': 64, 'model.mlp_dim': 256,
    'model.max_len': 64, 'model.dropout': 0.0, 'data.seq_len': 64, 'data.batch_size': 8,
    'data.vocab_size': 512, 'train.measure_peak': False, 'train.progress_bar': False,
    'train.sample_tokens': 0,
}


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tensorflow_datasets'))


# One persistent compilation cache for the subprocesses of a test worker: the many runs of the
# same small model compile each program once. Set by the session fixture below.
_compile_cache_dir = None


@pytest.fixture(scope='session', autouse=True)
def shared_compile_cache(tmp_path_factory):
  global _compile_cache_dir
  _compile_cache_dir = str(tmp_path_factory.mktemp('jax_cache'))


def module_env(devices: int = 1, compile_cache: bool = True,
               quick_compile: bool = False) -> dict[str, str]:
  """The environment of a test's subprocess. `quick_compile`: XLA:CPU compiles at optimisation
  level 0, in a half to a third of the time, with the same HLO (the same sharding, the same
  program, machine code not as fast): for tests that compare the programs of many meshes with
  each other, compiled alike, rather than with numbers computed elsewhere."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if quick_compile:
    env['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
  env['JAX_PLATFORMS'] = 'cpu'
  if compile_cache and _compile_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = _compile_cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return env


def run_module(module: str, *args: str, devices: int = 1, check: bool = True,
               timeout: int = 300, compile_cache: bool = True,
               quick_compile: bool = False) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=module_env(devices, compile_cache, quick_compile),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{module} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def train_args(workdir, tfds_dir, config='configs/default.py', **overrides) -> list[str]:
  flags = {**TINY, 'data.tfds_data_dir': tfds_dir, **overrides}
  return ([f'--config={config}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in flags.items()])


def train(workdir, tfds_dir, config='configs/default.py', devices=1, check=True, extra_flags=(),
          compile_cache=True, quick_compile=False, **overrides):
  return run_module('gpt_jax.train', *train_args(workdir, tfds_dir, config, **overrides),
                    *extra_flags, devices=devices, check=check, compile_cache=compile_cache,
                    quick_compile=quick_compile)


def read_metrics(workdir, key):
  """{step: value} of one metric from metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r[key] for r in rows if key in r}


def pytest_collection_modifyitems(items):
  """tests/cpu/ pins what XLA:CPU compiles (gpt_jax/backends/cpu: HLO forms, page faults, bf16
  fast paths) and is marked `cpu`; the rest of the suite asserts behaviour on any backend."""
  for item in items:
    if os.sep + os.path.join('tests', 'cpu') + os.sep in str(item.fspath):
      item.add_marker(pytest.mark.cpu)
