"""gpt_jax.finetune end to end: LoRA and full fine-tuning, resume, load_model and merge_lora."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import read_metrics, run_module, train
from gpt_jax import checkpoint, lora
from gpt_jax.sft import chat_template
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.datasets import support_faq
from gpt_jax.model import LoraConfig, ModelConfig, Transformer

RANK = 2
# A tiny base: char tokenizer, vocabulary exactly the tokenizer's (so the chat tokens need rows).
BASE = {'model.num_layers': 1, 'model.emb_dim': 32, 'model.mlp_dim': 64, 'model.max_len': 96,
        'data.seq_len': 96, 'data.tokenizer': 'char', 'train.num_steps': 4,
        'train.eval_every': 0, 'checkpoint.every_steps': 4}


@pytest.fixture(scope='module')
def base(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('base'))
  train(workdir, tfds_dir, **BASE)
  return workdir


@pytest.fixture(scope='module')
def chat_files(tmp_path_factory):
  """Short support conversations (no greeting or system message), train and held-out."""
  directory = tmp_path_factory.mktemp('chat')
  paths = {}
  for split in ('train', 'heldout'):
    paths[split] = str(directory / f'{split}.jsonl')
    with open(paths[split], 'w') as f:
      for name, (questions, answer) in sorted(support_faq.INTENTS.items())[:8]:
        for question in (questions[:-1] if split == 'train' else questions[-1:]):
          f.write(json.dumps({'messages': [{'role': 'user', 'content': question},
                                           {'role': 'assistant', 'content': answer[:40]}]})
                  + '\n')
  return paths


def finetune(workdir, base, chat_files, *flags, check=True, **overrides):
  settings = {'data.chat_files': chat_files['train'], 'train.num_steps': 4,
              'lora.rank': RANK, 'data.batch_size': 4, 'train.log_every': 1,
              'train.measure_peak': False, 'train.progress_bar': False,
              'train.sample_tokens': 0, 'train.eval_every': 0, 'optim.warmup_steps': 1,
              'checkpoint.every_steps': 2, 'optim.decay_steps': 4, **overrides}
  return run_module('gpt_jax.finetune', '--config=configs/sft.py', f'--init_from={base}',
                    f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in settings.items()],
                    *flags, check=check)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, base, chat_files):
  workdir = str(tmp_path_factory.mktemp('sft'))
  proc = finetune(workdir, base, chat_files,
                  **{'data.val_chat_files': chat_files['heldout'], 'train.eval_every': 4})
  return workdir, proc


def _saved_tree(workdir, step, item):
  path = os.path.join(workdir, 'checkpoints', str(step), item)
  return ocp.StandardCheckpointer().metadata(path).item_metadata.tree


def test_lora_run_trains_and_saves_only_adapters_and_chat_token_rows(base, lora_run):
  workdir, proc = lora_run
  base_tokens = tokenizer_lib.load(os.path.join(base, 'tokenizer')).vocab_size
  config = checkpoint.load_config(workdir)
  # The char tokenizer filled the base's vocabulary: 4 chat tokens grow it to a multiple of 64.
  assert config.model.vocab_size == lora.round_up(base_tokens + 4, 64)
  assert 'the embedding grows to' in proc.stderr
  assert config.init_step == 4 and config.init_from == os.path.abspath(base)

  cfg = ModelConfig.from_config(config.model)
  e, layers = cfg.emb_dim, cfg.num_layers
  # query, key, value, out, fc_in, fc_out: A is [in, r], B is [r, out], per layer.
  adapter_count = layers * RANK * (4 * (e + e) + (e + cfg.mlp_dim) * 2)
  params = _saved_tree(workdir, 4, 'params')
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
  assert sum(sizes) == adapter_count + 4 * e  # + the chat tokens' embedding rows
  assert set(params) == {'block_0', 'token_rows'}
  # Adam's two moments for the trained parameters and nothing else (plus step counters).
  opt_sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(_saved_tree(workdir, 4,
                                                                           'opt_state'))]
  assert sum(s for s in opt_sizes if s > 1) == 2 * sum(sizes)
  losses = read_metrics(workdir, 'train_loss')
  assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
  assert np.isfinite(read_metrics(workdir, 'val_loss')[4])


def test_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, base, chat_files, lora_run):
  workdir = str(tmp_path / 'interrupted')
  finetune(workdir, base, chat_files, **{'train.num_steps': 2})
  finetune(workdir, base, chat_files)  # resumes at step 2, to step 4
  uninterrupted = read_metrics(lora_run[0], 'train_loss')
  assert read_metrics(workdir, 'train_loss') == {s: uninterrupted[s] for s in (1, 2, 3, 4)}
  _, resumed, _ = checkpoint.load_model(workdir)
  _, straight, _ = checkpoint.load_model(lora_run[0])
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_load_model_and_merge_lora_give_the_adapted_models_logits(tmp_path, base, lora_run):
  workdir, _ = lora_run
  config = checkpoint.load_config(workdir)
  cfg = ModelConfig.from_config(config.model)
  lora_cfg = LoraConfig(rank=RANK, alpha=config.lora.alpha, targets=tuple(config.lora.targets))
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  tokens = jnp.asarray([[1, 5, chat_template.end_of_turn_id(tokenizer), 7, 3, 2]])

  # The adapted model, unmerged: base weights (grown) under the saved adapters and token rows.
  trainable = checkpoint.trainable_params(config, tokenizer)
  abstract = jax.eval_shape(lambda: trainable.split(nn.unbox(Transformer(cfg, lora_cfg).init(
      jax.random.key(0), tokens)['params']))[0])
  trained, step = checkpoint.restore_params(workdir, abstract)
  _, base_params, _ = checkpoint.load_model(base)
  adapted = trainable.assemble(trained, lora.grow_vocab(base_params, cfg.vocab_size))
  want, _ = jax.jit(Transformer(cfg, lora_cfg).apply)({'params': adapted}, tokens)

  _, loaded, loaded_step = checkpoint.load_model(workdir)
  assert loaded_step == step == 4
  got, _ = jax.jit(Transformer(cfg).apply)({'params': loaded}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  merged = str(tmp_path / 'merged')
  run_module('gpt_jax.convert.merge_lora', f'--workdir={workdir}', f'--out={merged}')
  merged_config = checkpoint.load_config(merged)
  assert merged_config.lora.rank == 0 and merged_config.init_from == ''
  assert tokenizer_lib.load(os.path.join(merged, 'tokenizer')).vocab_size == tokenizer.vocab_size
  merged_cfg, merged_params, _ = checkpoint.load_model(merged)
  got, _ = jax.jit(Transformer(merged_cfg).apply)({'params': merged_params}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The base is still the base: the adapters changed the logits.
  base_logits, _ = jax.jit(Transformer(cfg).apply)(
      {'params': lora.grow_vocab(base_params, cfg.vocab_size)}, tokens)
  assert np.abs(np.asarray(base_logits) - np.asarray(want)).max() > 1e-4


def test_full_finetuning_trains_every_parameter(tmp_path, base, chat_files):
  workdir = str(tmp_path / 'full')
  finetune(workdir, base, chat_files, **{'lora.rank': 0, 'train.num_steps': 2})
  cfg, params, step = checkpoint.load_model(workdir)
  assert step == 2 and params['wte']['embedding'].shape[0] == cfg.vocab_size
  saved = _saved_tree(workdir, 2, 'params')
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(saved)) == sum(
      x.size for x in jax.tree.leaves(params))


def test_malformed_chat_file_is_one_line_error_naming_the_line(tmp_path, base, chat_files):
  bad = tmp_path / 'bad.jsonl'
  with open(chat_files['train']) as f:
    lines = f.read().splitlines()
  bad.write_text('\n'.join(lines[:3] + ['{"messages": "hello"}'] + lines[3:]) + '\n')
  proc = finetune(str(tmp_path / 'w'), base, chat_files, check=False,
                  **{'data.chat_files': str(bad)})
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: {bad}:4: "messages" must be a non-empty list (skip malformed lines with '
      '--config.data.on_bad_lines=skip)')
