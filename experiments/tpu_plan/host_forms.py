r"""The 1B step compiled for a v5p-8 as it was built before code paths followed the target: with
the XLA:CPU forms of gpt_jax/backends/cpu/products.py and activations.py (chosen then from the CPU host) inside
the TPU program, beside today's: the 1B step's HBM per chip (the old program was measured at
18.52 GB with full remat, 81.98 GB with dots_saveable), and the temporaries of the small
weak-scaling shape of tests/test_aot.py at 16 and 64 chips.

  python experiments/tpu_plan/host_forms.py [--weak_only]
"""

import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from gpt_jax import target  # noqa: E402
from gpt_jax.tpu import topology as tpu
from gpt_jax.tpu import plan as tpu_plan
from test_aot import small_config  # noqa: E402


def llama_1b(remat: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs',
                      'llama_1b.py')
  spec = importlib.util.spec_from_file_location('llama_1b', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.remat = remat
  return config


def main():
  target_forms = target.is_cpu
  for forms, is_cpu in (('target (TPU) forms', target_forms), ('XLA:CPU forms', lambda: True)):
    target.is_cpu = is_cpu
    temps = {}
    for chips, name in ((16, 'v5p-32'), (64, 'v5p-128')):
      config = small_config(batch_size=chips, seq_len=2048)
      config.model.remat = 'full'
      temps[chips] = tpu_plan.compile_train(config, tpu.Slice.parse(name),
                                       with_eval=False)['temp_bytes']
    print(f'weak scaling, {forms:19s}: temporaries {temps[16] / 1e6:.0f} MB at 16 chips, '
          f'{temps[64] / 1e6:.0f} MB at 64 ({temps[64] / temps[16]:.2f}x)', flush=True)
  target.is_cpu = target_forms
  if '--weak_only' in sys.argv:
    return
  slice_ = tpu.Slice.parse('v5p-8')
  for remat in ('full', 'dots_saveable'):
    for forms, is_cpu in (('target (TPU) forms', target_forms), ('XLA:CPU forms', lambda: True)):
      target.is_cpu = is_cpu
      config = llama_1b(remat)
      config.model.attention = 'xla'  # as the old program's
      report = tpu_plan.compile_train(config, slice_, with_eval=False)
      print(f"remat={remat:13s} {forms:19s}: {report['hbm_bytes_per_chip'] / 1e9:.2f} GB per "
            f"chip ({report['temp_bytes'] / 1e9:.2f} GB temporaries)" if 'error' not in report
            else f"remat={remat:13s} {forms:19s}: {report['error']}", flush=True)
  target.is_cpu = target_forms


if __name__ == '__main__':
  main()
