"""The core install trains, samples and evaluates without the extras; a command whose extra is
missing says which one to install, in one line."""

import subprocess
import sys

import pytest

from conftest import REPO, module_env
from gpt_jax.config import base_config
from tiny_workdir import make_workdir, write_corpus

# Libraries that only extras bring (scipy is left out: jax itself depends on it).
EXTRA_ONLY = ('fastapi', 'uvicorn', 'pydantic', 'starlette', 'sacrebleu', 'rouge_score',
              'matplotlib', 'libtpu', 'onnx', 'onnxruntime', 'onnxscript', 'torch',
              'transformers', 'flatbuffers', 'datatrove')

WITHOUT_EXTRAS = f'''
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in {EXTRA_ONLY!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, Missing())
'''


def run_without_extras(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', WITHOUT_EXTRAS + code], cwd=REPO,
                        env=module_env(), capture_output=True, text=True, timeout=300)


def test_core_modules_import_without_any_extra():
  core = ['train', 'finetune', 'distill', 'sample', 'chat', 'eval', 'prune', 'sweep', 'aot',
          'convert.from_hf', 'convert.to_hf', 'convert.merge_lora', 'inference.engine',
          'inference.quantize', 'sft.finetuning']
  proc = run_without_extras(''.join(f'import gpt_jax.{m}\n' for m in core))
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('command, extra', [
    (['gpt_jax.serve', '--workdir=w'], 'serve'),
    (['gpt_jax.report', '--root={runs}'], 'report'),
    (['gpt_jax.export', '--workdir={workdir}', '--format=stablehlo', '--out={runs}/x'], 'export'),
])
def test_a_missing_extra_is_one_line_naming_it(command, extra, tmp_path, tfds_dir):
  if extra == 'export':
    make_workdir(str(tmp_path / 'workdir'), write_corpus(tfds_dir), tfds_dir)
  run = tmp_path / 'runs' / 'a'  # one run for the report to plot
  run.mkdir(parents=True)
  config = base_config()
  config.model.vocab_size = 256
  (run / 'config.json').write_text(config.to_json())
  (run / 'metrics.jsonl').write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.0}\n')
  command = [arg.format(runs=tmp_path / 'runs', workdir=tmp_path / 'workdir') for arg in command]
  proc = run_without_extras(f'sys.argv = {command!r}\n'
                            f'runpy.run_module({command[0]!r}, run_name="__main__")')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and f"pip install -e '.[{extra}]'" in lines[0], proc.stderr
