r"""The 1B step compiled for a v5p-8 as it was built before code paths followed the target: with
the XLA:CPU forms of gpt_jax/matmul.py and activations.py (chosen then from the CPU host) inside
the TPU program. Reproduces the figures measured on the old program (18.52 GB per chip with
full remat, 81.98 GB with dots_saveable), beside today's.

  python experiments/tpu_plan/host_forms.py
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from gpt_jax import aot, target, tpu  # noqa: E402


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
  slice_ = tpu.Slice.parse('v5p-8')
  target_forms = target.is_cpu
  for remat in ('full', 'dots_saveable'):
    for forms, is_cpu in (('target (TPU) forms', target_forms), ('XLA:CPU forms', lambda: True)):
      target.is_cpu = is_cpu
      report = aot.compile_train(llama_1b(remat), slice_, with_eval=False)
      print(f"remat={remat:13s} {forms:19s}: {report['hbm_bytes_per_chip'] / 1e9:.2f} GB per "
            f"chip ({report['temp_bytes'] / 1e9:.2f} GB temporaries)" if 'error' not in report
            else f"remat={remat:13s} {forms:19s}: {report['error']}", flush=True)
  target.is_cpu = target_forms


if __name__ == '__main__':
  main()
