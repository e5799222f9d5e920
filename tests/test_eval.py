"""The eval binary: loss, perplexity and bits per byte over a whole split, sharded over devices;
BLEU, ROUGE-L and the assistant loss of a chat model's greedy answers."""

import json
import math
import os

import jax
import numpy as np
import optax
import pytest

from conftest import run_module, train
from gpt_jax import checkpoint, data, decode, eval as eval_lib
from gpt_jax.sft import chat_template
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.model import Transformer
from rouge_score import rouge_scorer
import sacrebleu
from test_chat import make_chat_workdir

TINY_RUN = {'train.num_steps': 5, 'model.num_layers': 1, 'model.emb_dim': 32,
            'model.mlp_dim': 64, 'data.seq_len': 32, 'model.max_len': 32, 'data.batch_size': 4,
            'train.eval_every': 0}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tfds_dir):
  directory = str(tmp_path_factory.mktemp('trained'))
  train(directory, tfds_dir, **TINY_RUN)
  return directory


def reference(workdir, data_config, split, seq_len):
  """Total nats and predicted tokens, by a plain loop over the split's token stream."""
  cfg, params, _ = checkpoint.load_model(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  tokens = np.asarray(data.token_stream(data_config, tokenizer, workdir, split), np.int32)
  forward = jax.jit(lambda x: Transformer(cfg).apply({'params': params}, x)[0])
  total = 0.0
  for start in range(0, len(tokens) - 1, seq_len):
    window = tokens[start:start + seq_len + 1][None]
    logits = forward(window[:, :-1])
    total += float(optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).sum())
  return total, len(tokens) - 1


def test_eval_whole_split_on_two_devices(workdir, tfds_dir):
  proc = run_module('gpt_jax.eval', f'--workdir={workdir}', '--batch_size=3', devices=2)
  path = os.path.join(workdir, 'eval', 'pydoc_topics-validation-step5.json')
  assert path in proc.stdout and 'bits/byte' in proc.stdout
  assert 'eval validation' in proc.stderr  # the progress bar
  with open(path) as f:
    result = json.load(f)
  assert result['devices'] == 2 and result['batch_size'] == 4  # rounded up to the devices
  config = checkpoint.load_config(workdir)
  loss_sum, count = reference(workdir, config.data, 'validation', 32)
  num_bytes = sum(len(t.encode('utf-8')) for t in data.open_texts(config.data, 'validation'))
  assert result['tokens'] == count and result['bytes'] == num_bytes
  assert result['loss'] == pytest.approx(loss_sum / count, rel=1e-5)
  assert result['perplexity'] == pytest.approx(math.exp(result['loss']))
  assert result['bits_per_byte'] == pytest.approx(loss_sum / (math.log(2) * num_bytes), rel=1e-5)


def test_eval_text_files_and_errors(workdir, tmp_path):
  (tmp_path / 'a.txt').write_text('def f(x):\n    return x + 1\n' * 20)
  (tmp_path / 'b.txt').write_text('Caf\u00e9 \u4e2d\u6587 text.\n' * 30)
  pattern = str(tmp_path / '*.txt')
  result = eval_lib.evaluate(workdir, split='train', text_files=pattern, seq_len=16)
  config = checkpoint.load_config(workdir)
  config.data.text_files = pattern
  loss_sum, count = reference(workdir, config.data, 'train', 16)
  texts = list(data.open_texts(config.data, 'train'))
  assert result['bytes'] == sum(len(t.encode('utf-8')) for t in texts)
  assert result['tokens'] == count and result['loss'] == pytest.approx(loss_sum / count, rel=1e-5)
  assert os.path.exists(os.path.join(workdir, 'eval', 'text_files-train-step5.json'))

  with pytest.raises(FileNotFoundError, match='matches no files'):
    eval_lib.evaluate(workdir, text_files=str(tmp_path / '*.nothing'))
  with pytest.raises(ValueError, match=r'--seq_len must be in \[1, 32\]'):
    eval_lib.evaluate(workdir, seq_len=64)
  proc = run_module('gpt_jax.eval', f'--workdir={tmp_path / "missing"}', check=False)
  assert proc.returncode == 1
  missing = tmp_path / 'missing'
  assert proc.stderr.strip().splitlines() == [f'error: Workdir {missing} does not exist']


def test_chat_answers_scored_against_references(tmp_path):
  workdir = make_chat_workdir(str(tmp_path / 'chat'))  # context 64, byte tokens
  cfg, params, _ = checkpoint.load_model(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  generator = decode.Generator(cfg, params)

  def greedy(messages):  # one prompt per call: no batching, sorting or padding
    prompt = chat_template.render(tokenizer, messages, add_generation_prompt=True).tokens
    new = generator.generate([prompt], 8, temperature=0, truncate=True)[0]
    ends = [i for i, t in enumerate(new) if t in chat_template.stop_ids(tokenizer)]
    return tokenizer.decode(new[:ends[0]] if ends else new)

  def user(text):
    return {'role': 'user', 'content': text}

  prompts = [[user('What is a workdir?')], [user('Hello, what can you do?')],
             [{'role': 'system', 'content': 'Be brief.'}, user('How do I resume?')],
             [user('x'), {'role': 'assistant', 'content': 'y'}, user('and then?')],
             [user('a long question ' * 5)]]  # 86 prompt tokens: its start is dropped
  references = ['the directory of a run', greedy(prompts[1]), 'run the same command again',
                'z', 'a long answer']
  conversations = [p + [{'role': 'assistant', 'content': r}] for p, r in zip(prompts, references)]
  chat_file = tmp_path / 'heldout.jsonl'
  chat_file.write_text(''.join(json.dumps({'messages': c}) + '\n' for c in conversations))

  proc = run_module('gpt_jax.eval', f'--workdir={workdir}', f'--chat_files={chat_file}',
                    '--max_new_tokens=8', '--batch_size=3')
  path = os.path.join(workdir, 'eval', 'chat-heldout-step1.json')
  assert f'over 5 conversations -> {path}' in proc.stdout and 'generate' in proc.stderr
  with open(path) as f:
    result = json.load(f)
  with open(path.removesuffix('.json') + '.samples.jsonl') as f:
    samples = [json.loads(line) for line in f]
  answers = [greedy(p) for p in prompts]
  assert [s['answer'] for s in samples] == answers
  assert [s['reference'] for s in samples] == references
  assert [s['messages'] for s in samples] == prompts
  assert result['exact_match'] == 0.2 and samples[1]['rouge_l'] == 100  # the one answer known
  assert result['truncated_prompts'] == 1 and result['conversations'] == 5
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  assert result['rouge_l'] == pytest.approx(100 * np.mean(
      [scorer.score(r, a)['rougeL'].fmeasure for r, a in zip(references, answers)]))
  assert result['bleu'] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)

  # The loss on assistant tokens, one conversation at a time (the long one: its last 65 tokens).
  forward = jax.jit(lambda x: Transformer(cfg).apply({'params': params}, x)[0])
  total = count = 0.0
  for conversation in conversations:
    rendered = chat_template.render(tokenizer, conversation)
    tokens = np.array(rendered.tokens[-65:])[None]
    weights = np.array(rendered.weights[-65:])[None, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(forward(tokens[:, :-1]),
                                                             tokens[:, 1:])
    total, count = total + float((losses * weights).sum()), count + weights.sum()
  assert result['assistant_tokens'] == count
  assert result['assistant_loss'] == pytest.approx(total / count, rel=1e-5)


def test_chat_eval_errors(tmp_path):
  plain = make_chat_workdir(str(tmp_path / 'plain'), chat_tokens=False)
  with pytest.raises(ValueError, match='has no chat template tokens'):
    eval_lib.evaluate_chat(plain, str(tmp_path / '*.jsonl'))
  workdir = make_chat_workdir(str(tmp_path / 'chat'))
  with pytest.raises(FileNotFoundError, match='matches no files'):
    eval_lib.evaluate_chat(workdir, str(tmp_path / '*.jsonl'))
  (tmp_path / 'bad.jsonl').write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  with pytest.raises(ValueError, match='bad.jsonl:1: the conversation has no assistant message'):
    eval_lib.evaluate_chat(workdir, str(tmp_path / 'bad.jsonl'))
  proc = run_module('gpt_jax.eval', f'--workdir={workdir}', '--chat_files=x', '--split=train',
                    check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ['error: --chat_files cannot be combined with --split']
