"""Knowledge distillation: a student learns a frozen teacher's next-token distribution.

  loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the data

where x_T is softmax(logits / T) (Hinton et al., 2015: T^2 keeps the soft term's gradients on
the scale of the hard one's as T changes). `Distillation` is a `steps.Objective`: the teacher's
parameters are the step's frozen inputs, sharded by the run's rules, read from the teacher's
workdir at start-up and on every resume, and never saved with the student's checkpoints. The
step reports `distill_kl` (the KL at temperature T) and `train_ce` beside `train_loss`.

`configure` readies a run's config: the teacher's tokenizer and vocabulary, and its corpus unless
the config names one (gpt_jax/distill.py is the binary).
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import optax

from gpt_jax import checkpoint, sharding
from gpt_jax import config as config_lib
from gpt_jax import steps as steps_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

# config.data fields that say which corpus a run reads (copied from the teacher when the
# distillation config names no corpus).
CORPUS_FIELDS = ('tfds_name', 'tfds_data_dir', 'text_key', 'train_split', 'val_split',
                 'text_files', 'val_fraction')


def teacher_model_config(teacher: str) -> ModelConfig:
  """The teacher's architecture, as it runs in the student's step (no dropout, no remat)."""
  config = checkpoint.load_config(teacher)
  if config_lib.lora_config(config).rank:
    raise ConfigError(f'The teacher {teacher} is a LoRA workdir: merge it first '
                      '(python -m gpt_jax.convert.merge_lora)')
  cfg = ModelConfig.from_config(config.model)
  return dataclasses.replace(cfg, dropout=0.0, remat='none')


def configure(config, teacher: str, workdir: str) -> None:
  """Points `config` at `teacher` and gives the student the teacher's vocabulary, and the
  teacher's corpus when config.data names none. Errors name what does not fit."""
  if not teacher:
    raise ConfigError('--teacher is required: the workdir of the model to distill')
  if not os.path.isdir(teacher):
    raise FileNotFoundError(f'--teacher {teacher} is not a directory')
  teacher = os.path.abspath(teacher)
  teacher_config = checkpoint.load_config(teacher)
  teacher_cfg = teacher_model_config(teacher)
  config.distill.teacher = teacher
  config.distill.teacher_step = resolve_teacher_step(config, workdir)
  if not 0 <= config.distill.alpha <= 1:
    raise ConfigError(f'config.distill.alpha must be in [0, 1], got {config.distill.alpha}')
  if config.distill.temperature <= 0:
    raise ConfigError(f'config.distill.temperature must be positive, got '
                      f'{config.distill.temperature}')

  if config.model.vocab_size == 0:
    config.model.vocab_size = teacher_cfg.vocab_size
  if config.model.vocab_size != teacher_cfg.vocab_size:
    raise ConfigError(f'config.model.vocab_size ({config.model.vocab_size}) differs from the '
                      f"teacher's ({teacher_cfg.vocab_size}): a student predicts over the "
                      "teacher's vocabulary")
  if teacher_cfg.position == 'learned' and config.data.seq_len > teacher_cfg.max_len:
    raise ConfigError(f"config.data.seq_len ({config.data.seq_len}) exceeds the teacher's "
                      f'context (model.max_len={teacher_cfg.max_len})')
  if not (config.data.tfds_name or config.data.text_files):
    for field in CORPUS_FIELDS:
      if field in teacher_config.data:
        config.data[field] = teacher_config.data[field]
  for field in ('tokenizer', 'vocab_size', 'spm_model'):  # as the teacher's tokenizer was built
    if field in teacher_config.data:
      config.data[field] = teacher_config.data[field]


def resolve_teacher_step(config, workdir: str) -> int:
  """distill.teacher_step if set, else the one this workdir recorded (a resumed run keeps its
  teacher), else the teacher's latest checkpoint."""
  if config.distill.teacher_step >= 0:
    return config.distill.teacher_step
  if os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
    saved = checkpoint.load_config(workdir).get('distill') or {}
    if saved.get('teacher') == config.distill.teacher and saved.get('teacher_step', -1) >= 0:
      return saved['teacher_step']
  manager = checkpoint.make_manager(config.distill.teacher, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory} (the teacher)')
  return step


def copy_tokenizer(teacher: str, workdir: str) -> None:
  """The teacher's tokenizer into <workdir>/tokenizer/; one already there must be the same."""
  source, own = os.path.join(teacher, 'tokenizer'), os.path.join(workdir, 'tokenizer')
  if not os.path.isdir(source):
    raise FileNotFoundError(f'{source} not found: the teacher has no tokenizer')
  if not os.path.isdir(own):
    shutil.copytree(source, own, dirs_exist_ok=True)  # every process copies the same files
    return
  mine, theirs = (sorted(os.listdir(d)) for d in (own, source))
  same = mine == theirs and all(
      open(os.path.join(own, f), 'rb').read() == open(os.path.join(source, f), 'rb').read()
      for f in mine if os.path.isfile(os.path.join(own, f)))
  if not same:
    raise ConfigError(f"{own} differs from the teacher's tokenizer ({source}): distil into a "
                      'new workdir')


@dataclasses.dataclass(frozen=True)
class Distillation(steps_lib.Objective):
  """The distillation loss (module docstring); the teacher's parameters are the frozen inputs."""
  teacher: str
  teacher_step: int
  temperature: float
  alpha: float

  @classmethod
  def from_config(cls, config) -> 'Distillation':
    d = config.distill
    return cls(d.teacher, d.teacher_step, d.temperature, d.alpha)

  @property
  def teacher_model(self) -> Transformer:
    return Transformer(teacher_model_config(self.teacher))

  def abstract_inputs(self, seq_len: int, mesh, rules):
    return sharding.abstract_params(self.teacher_model, seq_len, mesh, rules)

  def load_inputs(self, abstract_inputs):
    params, _ = checkpoint.restore_params(self.teacher, abstract_inputs, self.teacher_step)
    return params

  def loss(self, model, params, batch, dropout_rng, inputs):
    deterministic = model.cfg.dropout == 0 and model.lora.dropout == 0
    if self.alpha == 0:  # cross-entropy alone: the teacher is not run (a from-scratch baseline)
      ce = steps_lib.loss_fn(model, params, batch, dropout_rng)
      return ce, {'train_ce': ce}
    logits = steps_lib.batch_logits(model, params, batch, deterministic, dropout_rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    weights = batch.get('weights', jnp.ones_like(ce)).astype(ce.dtype)
    mean = lambda x: jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1)
    teacher_logits = jax.lax.stop_gradient(
        steps_lib.batch_logits(self.teacher_model, inputs, batch))
    t = self.temperature
    kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / t),
                                                     jax.nn.log_softmax(teacher_logits / t))
    kl, ce = mean(kl), mean(ce)
    loss = self.alpha * t ** 2 * kl + (1 - self.alpha) * ce
    return loss, {'distill_kl': kl, 'train_ce': ce}
