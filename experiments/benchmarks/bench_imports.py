"""Import time of the binaries' modules: this environment against another set of packages.

  python experiments/benchmarks/bench_imports.py [--module=gpt_jax.train] [--repeats=7] \
      [--other_site=DIR]

Each repeat starts a fresh `python -c "import <module>"` and times it from outside (wall
seconds). With --other_site, DIR is put first on PYTHONPATH in alternate runs, so a package
installed there (`pip install --no-deps --target=DIR pkg==version`) replaces this environment's
copy; the two sides alternate, so that the machine's drift hits them alike. Prints the medians,
the ratio and the version of ml_dtypes each side imported (the package pinned in setup.cfg for
its import time).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def time_import(module: str, other_site: str = '') -> tuple[float, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if other_site:
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [other_site, env.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, '-c', f'import {module}, ml_dtypes; print(ml_dtypes.__version__)'],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  return time.perf_counter() - start, proc.stdout.strip()


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--module', default='gpt_jax.train')
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--other_site', default='')
  args = p.parse_args()
  sides = {'this environment': ''}
  if args.other_site:
    sides[f'with {args.other_site} first'] = args.other_site
  times = {side: [] for side in sides}
  versions = {}
  for _ in range(args.repeats):
    for side, site in sides.items():
      seconds, versions[side] = time_import(args.module, site)
      times[side].append(seconds)
  for side in sides:
    print(f'{side}: import {args.module} median {statistics.median(times[side]):.2f} s '
          f'(min {min(times[side]):.2f}, max {max(times[side]):.2f}; ml_dtypes {versions[side]})')
  if args.other_site:
    (a, ta), (b, tb) = times.items()
    print(f'ratio {b} / {a}: {statistics.median(tb) / statistics.median(ta):.2f}x '
          f'(load {os.getloadavg()[0]:.1f})')


if __name__ == '__main__':
  main()
