"""The chat binary: one message, stdin, the REPL's /reset and /exit, history kept in the context.
And what it is for: after a short fine-tuning on the FAQ, held-out answers match far better."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, module_env, run_module, train
from gpt_jax import checkpoint, decode
from gpt_jax.sft import chat_template
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import base_config
from gpt_jax.datasets import support_faq
from gpt_jax.model import ModelConfig, Transformer

MAX_NEW = 8  # reply tokens: short replies keep the tests fast


def make_chat_workdir(workdir: str, max_len: int = 64, chat_tokens: bool = True) -> str:
  """A workdir with a freshly initialised tiny model and a byte tokenizer (with the chat
  template's tokens if chat_tokens): what the binaries read, without a training run.

  Its output columns are zero except for lowercase letters and space, so a greedy reply is
  readable text that never ends early: it runs to max_new_tokens.
  """
  tokenizer = tokenizer_lib.ByteTokenizer()
  if chat_tokens:
    tokenizer = chat_template.add_chat_tokens(tokenizer)
  config = base_config()
  config.data.tokenizer = 'byte'
  config.data.seq_len = max_len
  model = config.model
  model.num_layers, model.num_heads, model.emb_dim, model.mlp_dim = 2, 4, 64, 128
  model.max_len, model.dropout, model.vocab_size = max_len, 0.0, tokenizer.vocab_size
  model.tie_embeddings = False
  checkpoint.save_config(workdir, config)
  tokenizer.save(os.path.join(workdir, 'tokenizer'))
  cfg = ModelConfig.from_config(config.model)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  params = nn.unbox(params)
  readable = np.zeros(tokenizer.vocab_size, bool)
  readable[list(b' abcdefghijklmnopqrstuvwxyz')] = True
  params['lm_head']['kernel'] = jnp.where(readable, params['lm_head']['kernel'], 0)
  checkpoint.save_params(workdir, 1, params)
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return make_chat_workdir(str(tmp_path_factory.mktemp('chat')))


@pytest.fixture(scope='module')
def greedy_reply(workdir):
  """reply(messages): the greedy reply to a conversation ending with a user message, decoded
  from Generator.generate (one jitted call), independently of the binary's streaming."""
  cfg, params, _ = checkpoint.load_model(workdir)
  generator = decode.Generator(cfg, params)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  stops = chat_template.stop_ids(tokenizer)

  def reply(messages, max_new_tokens=MAX_NEW):
    prompt = chat_template.render(tokenizer, messages, add_generation_prompt=True).tokens
    new = generator.generate([prompt], max_new_tokens, temperature=0)[0]
    ends = [i for i, t in enumerate(new) if t in stops]
    return tokenizer.decode(new[:ends[0]] if ends else new)

  return reply


def chat(workdir, *flags, stdin=None, check=True):
  proc = subprocess.run(
      [sys.executable, '-m', 'gpt_jax.chat', f'--workdir={workdir}', '--temperature=0',
       f'--max_new_tokens={MAX_NEW}', *flags],
      cwd=REPO, env=module_env(), input=stdin, capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f'gpt_jax.chat {flags} failed ({proc.returncode}):\n{proc.stderr}')
  return proc


def user(text):
  return {'role': 'user', 'content': text}


def assistant(text):
  return {'role': 'assistant', 'content': text}


def test_message_prints_only_the_reply(workdir, greedy_reply):
  system = {'role': 'system', 'content': 'Be brief.'}
  expected = greedy_reply([system, user('Hello there')])
  proc = chat(workdir, '--message=Hello there', '--system=Be brief.')
  assert proc.stdout == expected + '\n'
  assert expected != greedy_reply([user('Hello there')])  # the system prompt was sent

  proc = chat(workdir, '--message=-', stdin='Hello\nthere\n')  # one message read from stdin
  assert proc.stdout == greedy_reply([user('Hello\nthere\n')]) + '\n'


def test_repl_reset_exit_and_history_dropped_to_fit_the_context(workdir, greedy_reply):
  hi = greedy_reply([user('Hi')])
  hi_again = greedy_reply([user('Hi'), assistant(hi), user('Hi')])
  assert hi != hi_again  # else /reset could not be told from no reset
  # A turn is 1 + 20 + 1 user tokens and 1 + 8 + 1 reply tokens, 32 in all: beside a new
  # message (23 tokens with the generation prompt) and 8 tokens of reply room, the 64-token
  # context holds one earlier turn, not two.
  a, b, c = 'a' * 20, 'b' * 20, 'c' * 20
  first = greedy_reply([user(a)])
  second = greedy_reply([user(a), assistant(first), user(b)])
  third = greedy_reply([user(b), assistant(second), user(c)])
  fourth = greedy_reply([user(c), assistant(third), user(a)])
  too_long = 'x' * 70  # the history stays: the next message still sees the last turn
  lines = ['Hi', 'Hi', '/reset', 'Hi', '/help', '/reset', a, b, c, too_long, a, '/exit', 'unsent']
  proc = chat(workdir, stdin='\n'.join(lines) + '\n')
  assert proc.stdout == f'{hi}\n{hi_again}\n{hi}\n{first}\n{second}\n{third}\n{fourth}\n'
  drop = "[dropped the oldest 1 turn of the conversation to fit the model's context of 64 tokens]"
  assert proc.stderr.splitlines() == [
      '[conversation reset]', '[unknown command /help; /reset: start the conversation over, '
      '/exit: quit]', '[conversation reset]', drop,
      "[error: The message takes 73 tokens: no room for a reply in the model's context of 64 "
      'tokens]', drop]


def test_errors_are_one_line(workdir, tmp_path):
  plain = make_chat_workdir(str(tmp_path / 'plain'), chat_tokens=False)
  cases = {
      (f'--workdir={plain}', '--message=Hi'):
          'error: This tokenizer has no chat template tokens: the model was not fine-tuned for '
          'chat (python -m gpt_jax.finetune adds them).',
      (f'--workdir={workdir}', '--message=' + 'x' * 70):
          "error: The message takes 73 tokens: no room for a reply in the model's context of 64 "
          'tokens',
  }
  for flags, error in cases.items():
    proc = run_module('gpt_jax.chat', *flags, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [error], flags


def test_sft_answers_held_out_questions_far_better(tmp_path, tfds_dir):
  """A tiny base, fine-tuned for 300 steps on the FAQ's train split, against the same model
  before fine-tuning (the chat tokens added, no update: learning rate 0), both answering the
  held-out paraphrases through `eval --chat_files`."""
  base = str(tmp_path / 'base')
  train(base, tfds_dir, **{'train.num_steps': 10, 'train.eval_every': 0, 'model.max_len': 128,
                           'data.seq_len': 128})
  files = support_faq.write(str(tmp_path / 'faq'))
  heldout = tmp_path / 'heldout.jsonl'  # every 3rd held-out conversation: 40, one per intent
  with open(files['heldout']) as f:
    heldout.write_text(''.join(f.readlines()[::3]))

  def finetune_and_eval(name, *flags):
    workdir = str(tmp_path / name)
    run_module('gpt_jax.finetune', '--config=configs/sft.py', f'--init_from={base}',
               f'--workdir={workdir}', f'--config.data.chat_files={files["train"]}',
               '--config.lora.rank=0', '--config.data.batch_size=16', '--config.train.eval_every=0',
               '--config.train.sample_tokens=0', '--config.train.progress_bar=False', *flags)
    proc = run_module('gpt_jax.eval', f'--workdir={workdir}', f'--chat_files={heldout}',
                      '--max_new_tokens=24', '--progress_bar=False')
    with open(proc.stdout.strip().rsplit(' -> ', 1)[1]) as f:
      return json.load(f)

  before = finetune_and_eval('before', '--config.train.num_steps=1', '--config.optim.lr=0')
  after = finetune_and_eval('after', '--config.train.num_steps=300', '--config.optim.lr=3e-3')
  assert before['conversations'] == after['conversations'] == 40
  # Measured (2 CPU cores): ROUGE-L 0.6 before, 6.7 after; assistant loss 6.3 -> 1.7 nats.
  assert after['rouge_l'] > 4 * max(before['rouge_l'], 1)
  assert after['assistant_loss'] < before['assistant_loss'] - 3
