"""gpt_jax.backends.cpu.host_memory: XLA:CPU's temporary buffers are reused instead of faulted in afresh."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A train-step-like program (donated state, temporaries of 64 MB) run to a steady state; prints
# whether the setting was applied and the median page faults of 20 steady-state steps. (The
# median, not the mean: once, in a full parallel test run, the kept run averaged 6846 faults per
# step against 20205 without the setting, which no run alone reproduced; alone it is 0.)
STEPS = r'''
import resource, sys
from gpt_jax.backends.cpu import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False
import jax, jax.numpy as jnp

def step(w, x):
  h = jnp.tanh(x @ w)
  return w - 1e-3 * (x.T @ (h * (1 - h * h)))

step = jax.jit(step, donate_argnums=0)
w, x = jnp.zeros((1024, 1024)), jnp.ones((16384, 1024)) / 1024
for _ in range(5):
  w = step(w, x)
w.block_until_ready()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(20):
  before = faults()
  w = step(w, x)
  w.block_until_ready()
  per_step.append(faults() - before)
print(applied, sorted(per_step)[10], host_memory.keep_freed_memory())
'''


def run(*args, env=None):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  out = subprocess.run([sys.executable, '-c', STEPS, *args], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  applied, faults, again = out.stdout.split()
  return applied == 'True', int(faults), again == 'True'


def test_kept_memory_removes_the_page_faults_of_each_step():
  applied, default_faults, late = run('default')
  assert not applied
  assert not late  # JAX had started: too late, nothing changed
  assert default_faults > 10_000  # 64 MB temporaries mapped afresh at every step
  applied, kept_faults, again = run('keep')
  assert applied and again
  assert kept_faults < default_faults / 4, (kept_faults, default_faults)


def test_left_alone_when_jax_computes_on_an_accelerator():
  # Decided from JAX_PLATFORMS alone: no backend is started (there is no GPU here).
  code = 'from gpt_jax.backends.cpu import host_memory; print(host_memory.keep_freed_memory())'
  for platforms, expected in (('cuda,cpu', 'False'), ('tpu', 'False'), ('cpu', 'True')):
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, 'JAX_PLATFORMS': platforms}, timeout=120)
    assert out.stdout.strip() == expected, (platforms, out.stdout, out.stderr[-1000:])
