"""Distillation: the loss is alpha T^2 KL + (1 - alpha) CE; the binary runs train's loop with the
teacher sharded beside the state (never saved), resumes exactly, and names bad teachers."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import log_softmax

from conftest import read_metrics, run_module
from gpt_jax import checkpoint
from gpt_jax.compress import distillation
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer
from tiny_workdir import make_workdir, write_corpus

STUDENT = {'model.num_layers': 1, 'model.emb_dim': 32, 'model.mlp_dim': 64, 'model.max_len': 32,
           'data.seq_len': 32, 'data.batch_size': 4, 'train.log_every': 1, 'train.eval_every': 4,
           'train.eval_batches': 2, 'train.sample_tokens': 0, 'train.measure_peak': False,
           'train.progress_bar': False, 'checkpoint.every_steps': 2, 'mesh.fsdp': 2,
           'distill.temperature': 2.0, 'distill.alpha': 0.25}


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, tfds_dir):
  directory = tmp_path_factory.mktemp('distill')
  corpus = write_corpus(tfds_dir)
  path = str(directory / 'teacher')
  make_workdir(path, corpus, tfds_dir, scale=3.0, num_kv_heads=2, mlp='swiglu')
  return path


def distill(workdir, teacher, check=True, **overrides):
  flags = {**STUDENT, 'train.num_steps': 4, **overrides}
  return run_module('gpt_jax.distill', '--config=configs/distill.py', f'--teacher={teacher}',
                    f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in flags.items()],
                    devices=2, check=check)


def test_loss_is_the_weighted_sum_of_tempered_kl_and_cross_entropy():
  cfg = ModelConfig(vocab_size=11, max_len=8, num_layers=1, num_heads=2, emb_dim=16, mlp_dim=32)
  model = Transformer(cfg)
  init_fn = jax.jit(model.init)  # one compilation for both
  init = lambda seed: nn.unbox(init_fn(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))[
      'params']
  student, teacher_params = init(0), jax.tree.map(lambda x: 5 * x, init(1))
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 11, (2, 8)), 'targets': rng.integers(0, 11, (2, 8)),
           'weights': np.array([[1.0] * 8, [1.0] * 5 + [0.0] * 3], np.float32)}

  class WithTeacher(distillation.Distillation):
    teacher_model = model

  objective = WithTeacher('unused', 0, 3.0, 0.3)
  loss_fn = jax.jit(lambda params, teacher: objective.loss(model, params, batch, None, teacher))
  loss, metrics = loss_fn(student, teacher_params)
  forward = jax.jit(lambda params: model.apply({'params': params}, batch['inputs'])[0])
  s, t = (np.asarray(forward(p), np.float64) for p in (student, teacher_params))
  p_log, q_log = log_softmax(t / 3, -1), log_softmax(s / 3, -1)
  kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
  ce = -np.take_along_axis(log_softmax(s, -1), batch['targets'][..., None], -1)[..., 0]
  w = batch['weights']
  kl, ce = (kl * w).sum() / w.sum(), (ce * w).sum() / w.sum()
  np.testing.assert_allclose(metrics['distill_kl'], kl, rtol=1e-4)
  np.testing.assert_allclose(metrics['train_ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.3 * 9 * kl + 0.7 * ce, rtol=1e-5)
  assert kl > 0.01
  _, same = loss_fn(student, student)
  assert abs(float(same['distill_kl'])) < 1e-6


def test_distill_trains_resumes_exactly_and_saves_only_the_student(teacher, tmp_path):
  workdir = str(tmp_path / 'student')
  distill(workdir, teacher)
  kl, ce, loss = (read_metrics(workdir, k) for k in ('distill_kl', 'train_ce', 'train_loss'))
  assert sorted(kl) == sorted(ce) == sorted(loss) == [1, 2, 3, 4]
  for step in loss:
    assert loss[step] == pytest.approx(0.25 * 4 * kl[step] + 0.75 * ce[step], rel=1e-5)
  assert 4 in read_metrics(workdir, 'val_loss')
  config = checkpoint.load_config(workdir)
  assert config.distill.teacher == os.path.abspath(teacher) and config.distill.teacher_step == 1
  assert config.model.vocab_size == checkpoint.load_config(teacher).model.vocab_size
  cfg, params, _ = checkpoint.load_model(workdir)  # the student's parameters alone
  assert cfg.num_layers == 1 and sorted(params) == ['block_0', 'ln_f', 'wpe', 'wte']

  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  _, before, _ = checkpoint.load_model(workdir, 2)
  distill(workdir, teacher)  # resumes from step 2
  assert read_metrics(workdir, 'train_loss') == loss
  _, again, _ = checkpoint.load_model(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(again)))


def _config(**distill):
  config = ml_collections.ConfigDict({
      'model': {'vocab_size': 0}, 'data': {'tfds_name': '', 'text_files': '', 'seq_len': 32},
      'distill': {'teacher': '', 'teacher_step': -1, 'temperature': 2.0, 'alpha': 0.5,
                  **distill}})
  return config


def test_bad_teachers_and_settings_are_named(teacher, tmp_path):
  with pytest.raises(FileNotFoundError, match='--teacher .*missing is not a directory'):
    distillation.configure(_config(), str(tmp_path / 'missing'), str(tmp_path / 'out'))
  config = _config()
  config.model.vocab_size = 7
  with pytest.raises(ConfigError, match=r"vocab_size \(7\) differs from the teacher's"):
    distillation.configure(config, teacher, str(tmp_path / 'out'))
  with pytest.raises(ConfigError, match='alpha'):
    distillation.configure(_config(alpha=1.5), teacher, str(tmp_path / 'out'))
  config = _config()
  distillation.configure(config, teacher, str(tmp_path / 'out'))
  assert config.data.text_files == checkpoint.load_config(teacher).data.text_files
  other = tmp_path / 'other' / 'tokenizer'
  shutil.copytree(os.path.join(teacher, 'tokenizer'), other)
  for name in os.listdir(other):
    with open(other / name, 'a') as f:
      f.write(' ')
  with pytest.raises(ConfigError, match="differs from the teacher's tokenizer"):
    distillation.copy_tokenizer(teacher, str(tmp_path / 'other'))
  proc = distill(str(tmp_path / 'cli'), str(tmp_path / 'missing'), check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --teacher {tmp_path / 'missing'} is not a directory")
