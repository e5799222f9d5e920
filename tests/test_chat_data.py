"""Chat data: the support FAQ dataset, JSONL errors, encoding, packing and its resumable order."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpt_jax import lora, steps
from gpt_jax.sft import chat_template
from gpt_jax.sft import chat_data
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.datasets import support_faq
from gpt_jax.errors import ConfigError
from gpt_jax.model import LoraConfig, ModelConfig, Transformer


@pytest.fixture(scope='module')
def tokenizer():
  return chat_template.add_chat_tokens(tokenizer_lib.ByteTokenizer())


def _config(chat_files, seq_len=64, batch_size=4, **data):
  return ml_collections.ConfigDict({'seed': 0, 'data': {
      'chat_files': chat_files, 'val_chat_files': '', 'seq_len': seq_len,
      'batch_size': batch_size, 'on_bad_lines': 'raise', 'long_conversations': 'truncate',
      **data}})


def _write_jsonl(path, lines):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def _conversation(question, answer):
  return json.dumps({'messages': [{'role': 'user', 'content': question},
                                  {'role': 'assistant', 'content': answer}]})


def test_support_faq_is_deterministic_and_holds_out_unseen_paraphrases(tmp_path):
  paths = support_faq.write(str(tmp_path / 'a'))
  again = support_faq.write(str(tmp_path / 'b'))
  for split in ('train', 'heldout'):
    with open(paths[split], 'rb') as f, open(again[split], 'rb') as g:
      assert f.read() == g.read()
  train_records = list(support_faq.conversations('train'))
  heldout = list(support_faq.conversations('heldout'))
  assert len(support_faq.INTENTS) >= 30
  assert {r['intent'] for r in heldout} == {r['intent'] for r in train_records}
  train_questions = {m['content'] for r in train_records for m in r['messages']
                     if m['role'] == 'user'}
  for record in heldout:
    question, answer = record['messages'][-2]['content'], record['messages'][-1]['content']
    assert question not in train_questions
    assert answer == support_faq.INTENTS[record['intent']][1]
  # Every line is a valid conversation for the reader.
  assert len(list(chat_template.read_conversations(paths['train'], 'raise'))) == len(
      train_records)


def test_bad_lines_are_skipped_or_rejected_with_their_line_number(tmp_path, capsys):
  path = _write_jsonl(tmp_path / 'chat.jsonl', [
      _conversation('Hi', 'Hello'), '{"messages": [', '{"messages": [{"role": "bot", '
      '"content": "x"}]}', _conversation('Bye', 'Goodbye')])
  with pytest.raises(ConfigError, match=r'chat.jsonl:2: bad JSON'):
    chat_data.read_conversations(path, 'raise')
  conversations = chat_data.read_conversations(path, 'skip')
  assert [c[0]['content'] for c in conversations] == ['Hi', 'Bye']
  err = capsys.readouterr().err
  assert 'chat.jsonl:2:' in err and "chat.jsonl:3: message 0 has role 'bot'" in err
  with pytest.raises(ConfigError, match='matches no file'):
    chat_data.read_conversations(str(tmp_path / 'missing*.jsonl'))


def test_encode_weights_assistant_tokens_and_truncates_long_conversations(tokenizer):
  conversations = [[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}],
                   [{'role': 'user', 'content': 'x' * 100},
                    {'role': 'assistant', 'content': 'late'}],
                   [{'role': 'user', 'content': 'y' * 10},
                    {'role': 'assistant', 'content': 'z' * 100}]]
  examples, stats = chat_data.encode(tokenizer, conversations, seq_len=32)
  # <|user|> H i <|end|> <|assistant|> Y o <|end|>: targets 'Y', 'o', <|end|> are trained.
  first = examples[0]
  end = chat_template.end_of_turn_id(tokenizer)
  assert first['targets'][first['weights'] == 1].tolist() == [ord('Y'), ord('o'), end]
  # The second lost its whole answer to truncation: dropped; the third was cut.
  assert (stats.conversations, stats.truncated, stats.dropped) == (3, 2, 1)
  assert len(examples) == 2 and len(examples[1]['inputs']) == 32
  _, drop_stats = chat_data.encode(tokenizer, conversations, seq_len=32,
                                  long_conversations='drop')
  assert (drop_stats.truncated, drop_stats.dropped) == (0, 2)


@pytest.mark.parametrize('position', ['learned', 'rope'])
def test_packed_batch_gives_each_conversation_its_own_loss(tmp_path, tokenizer, position):
  lines = [_conversation(f'Question {i}?', 'Answer ' + 'ab' * i) for i in range(7)]
  config = _config(_write_jsonl(tmp_path / 'chat.jsonl', lines), seq_len=64)
  batch = next(chat_data.make_train_iterator(config, tokenizer))
  assert batch['segment_ids'].max() >= 2  # several conversations share a row

  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_len=64, num_layers=2, num_heads=2,
                    emb_dim=32, mlp_dim=64, position=position)
  model = Transformer(cfg, LoraConfig(rank=2))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  # Non-zero adapters, so that their path is checked too.
  params = jax.tree.map(lambda x: x + 0.05 if x.ndim > 1 else x, params)
  losses = jax.jit(lambda b: steps.token_losses(model, params, b)[0])
  packed_losses = losses(batch)

  # Each conversation alone in a row, at its start (the padding after it cannot affect it).
  where = [(row, segment) for row in range(batch['inputs'].shape[0])
           for segment in sorted(set(batch['segment_ids'][row].tolist()) - {0})]
  alone = {k: np.zeros((len(where), 64), np.int32) for k in ('inputs', 'targets')}
  for i, (row, segment) in enumerate(where):
    cols = batch['segment_ids'][row] == segment
    for k in alone:
      alone[k][i, :cols.sum()] = batch[k][row, cols]
  alone_losses = losses(alone)
  for i, (row, segment) in enumerate(where):
    cols = batch['segment_ids'][row] == segment
    np.testing.assert_allclose(packed_losses[row, cols], alone_losses[i, :cols.sum()],
                               rtol=2e-5, atol=2e-5)
  checked = len(where)
  assert checked >= 4


def test_train_iterator_resumes_where_it_stopped(tmp_path, tokenizer):
  lines = [_conversation(f'Question {i}?', 'Answer ' + 'c' * (i % 9)) for i in range(30)]
  config = _config(_write_jsonl(tmp_path / 'chat.jsonl', lines), seq_len=48, batch_size=2)
  iterator = chat_data.make_train_iterator(config, tokenizer)
  for _ in range(7):  # past the first epoch
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  resumed = chat_data.make_train_iterator(config, tokenizer)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(4)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # Two processes each take their half of the same global batch.
  halves = [next(chat_data.make_train_iterator(config, tokenizer, p, 2)) for p in (0, 1)]
  whole = next(chat_data.make_train_iterator(config, tokenizer))
  np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves]), whole['inputs'])


def test_grow_vocab_appends_mean_rows_and_trainable_rows_round_trip():
  cfg = ModelConfig(vocab_size=10, max_len=8, num_layers=1, num_heads=2, emb_dim=8, mlp_dim=16,
                    tie_embeddings=False)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0),
                                                   jnp.zeros((1, 4), jnp.int32))['params'])
  grown = lora.grow_vocab(params, 16)
  wte, head = grown['wte']['embedding'], grown['lm_head']['kernel']
  assert wte.shape == (16, 8) and head.shape == (8, 16)
  np.testing.assert_allclose(wte[10:], np.broadcast_to(params['wte']['embedding'].mean(0),
                                                       (6, 8)), rtol=1e-6)
  np.testing.assert_array_equal(wte[:10], params['wte']['embedding'])
  assert lora.round_up(50257 + 4, 64) == 50304

  lora_cfg = LoraConfig(rank=2)
  adapted = nn.unbox(jax.jit(Transformer(dataclasses.replace(cfg, vocab_size=16), lora_cfg).init)(
      jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  trainable = lora.Trainable(lora_cfg, token_ids=(12, 15))
  trained, frozen = trainable.split(adapted)
  assert trained['token_rows']['wte'].shape == (2, 8)
  assert trained['token_rows']['lm_head'].shape == (8, 2)
  assert 'wte' in frozen and not lora.split(frozen)[1]
  rebuilt = trainable.assemble(trained, frozen)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, adapted)

