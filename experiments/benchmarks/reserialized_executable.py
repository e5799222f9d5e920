"""XLA:CPU (jaxlib 0.10.2): an executable read from the persistent compilation cache, serialized
again with `jax.experimental.serialize_executable`, fails to run in the next process.

  python experiments/benchmarks/reserialized_executable.py

Runs four processes on a fresh cache: compile (cache miss) and save; load and run (works);
compile again (now a cache hit) and save; load and run (fails: "Function ... not found").
This is why gpt_jax/traced_steps.py saves the exported (traced) step, not the executable.
"""
import subprocess
import sys
import tempfile

CHILD = r'''
import pickle, sys
import jax, jax.numpy as jnp
from jax.experimental import serialize_executable
jax.config.update('jax_compilation_cache_dir', sys.argv[2])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

def f(x):
  words = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  return jnp.sum(words * (jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1), dtype=jnp.uint32)

x = jnp.ones((128, 4, 32))
path = sys.argv[2] + '/executable.bin'
if sys.argv[1] == 'save':
  compiled = jax.jit(f).lower(x).compile()
  with open(path, 'wb') as file:
    file.write(pickle.dumps(serialize_executable.serialize(compiled)))
else:
  with open(path, 'rb') as file:
    compiled = serialize_executable.deserialize_and_load(*pickle.load(file))
print(int(compiled(x)))
'''


def main():
  with tempfile.TemporaryDirectory() as cache:
    for step, action in enumerate(['save', 'load', 'save', 'load']):
      proc = subprocess.run([sys.executable, '-c', CHILD, action, cache], capture_output=True,
                            text=True)
      result = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]
      what = ('compile (cache miss), save', 'load, run', 'compile (cache hit), save',
              'load, run')[step]
      print(f'{what:28s} -> {result}')


if __name__ == '__main__':
  main()
