"""A tokenizer's own Jinja chat template: the ids of transformers' apply_chat_template, and loss
weights on exactly the assistant's turns."""

import pytest

import hf_tokenizers
from gpt_jax.sft import chat_template
from gpt_jax.sft import hf_chat_template
from gpt_jax.sft import chat_data
from gpt_jax import tokenizer as tokenizer_lib

transformers = pytest.importorskip('transformers')

SYSTEM = {'role': 'system', 'content': 'You are terse.'}
CONVERSATIONS = [
    [{'role': 'user', 'content': 'Hi!'}],
    [{'role': 'user', 'content': 'Hi!'}, {'role': 'assistant', 'content': 'Hello.'}],
    [SYSTEM, {'role': 'user', 'content': 'What is  2+2?\n'},
     {'role': 'assistant', 'content': ' 4, of course. 😀'}],
    [SYSTEM, {'role': 'user', 'content': 'café?'}, {'role': 'assistant', 'content': 'Oui.'},
     {'role': 'user', 'content': 'ok'}, {'role': 'assistant', 'content': 'ok'},
     {'role': 'user', 'content': 'Say <|eot_id|> or </s>'}],
    [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y\n\nz'},
     {'role': 'user', 'content': 'and?'}, {'role': 'assistant', 'content': ''}],
]


@pytest.fixture(scope='module', params=sorted(hf_tokenizers.STYLES))
def tokenizers_pair(request, tmp_path_factory):
  directory = hf_tokenizers.build(str(tmp_path_factory.mktemp(request.param)), request.param)
  return (request.param, tokenizer_lib.HuggingFaceTokenizer.from_directory(directory),
          transformers.AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize('generation_prompt', [False, True])
def test_same_ids_as_apply_chat_template(tokenizers_pair, generation_prompt):
  _, ours, theirs = tokenizers_pair
  assert chat_template.has_chat_tokens(ours)
  for messages in CONVERSATIONS:
    expected = theirs.apply_chat_template(messages, tokenize=True,
                                          add_generation_prompt=generation_prompt,
                                          return_dict=False)
    rendered = chat_template.render(ours, messages, add_generation_prompt=generation_prompt)
    assert rendered.tokens == list(expected), messages
    assert len(rendered.weights) == len(rendered.tokens)


def test_weights_cover_each_assistant_turn_and_its_end(tokenizers_pair):
  style, ours, _ = tokenizers_pair
  end = chat_template.end_of_turn_id(ours)
  assert end == ours.token_id({'llama3': '<|eot_id|>', 'qwen2': '<|im_end|>',
                               'mistral': '</s>'}[style])
  marker = ours._tok.id_to_token(end)
  for messages in CONVERSATIONS:
    rendered = chat_template.render(ours, messages)
    text = hf_chat_template.render_text(ours, messages)
    _, offsets = ours.encode_with_offsets(text)
    runs, start = [], None  # the weighted runs, as [first, last] token indices
    for i, weight in enumerate(rendered.weights + [0]):
      if weight and start is None:
        start = i
      elif not weight and start is not None:
        runs.append((start, i - 1))
        start = None
    replies = [m['content'] for m in messages if m['role'] == 'assistant']
    assert len(runs) == len(replies)
    for (first, last), reply in zip(runs, replies):
      assert rendered.tokens[last] == end and end not in rendered.tokens[first:last]
      assert text[offsets[first][0]:offsets[last][1]].strip() == reply.strip() + marker


def test_mask_equals_transformers_generation_blocks(tmp_path):
  """A template marking the assistant's turns with {% generation %}: transformers' own
  assistant mask, and ours, derived from the rendered turns without those marks."""
  template = hf_tokenizers.LLAMA3_TEMPLATE.replace(
      "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
      " + message['content'] | trim + '<|eot_id|>' }}",
      "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
      "{%- if message['role'] == 'assistant' %}{% generation %}"
      "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
      "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}")
  assert template != hf_tokenizers.LLAMA3_TEMPLATE
  directory = hf_tokenizers.build(str(tmp_path / 'tok'), 'llama3', chat_template=False)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  theirs.chat_template = template
  theirs.save_pretrained(directory)
  ours = tokenizer_lib.HuggingFaceTokenizer.from_directory(directory)
  assert ours.chat_template == template
  for messages in CONVERSATIONS[1:]:
    expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    rendered = chat_template.render(ours, messages)
    assert rendered.tokens == list(expected['input_ids'])
    assert rendered.weights == list(expected['assistant_masks']), messages


def test_sft_examples_and_refusals(tokenizers_pair):
  style, ours, _ = tokenizers_pair
  examples, stats = chat_data.encode(ours, CONVERSATIONS[1:], seq_len=256)
  assert stats.dropped == stats.truncated == 0 and len(examples) == 4
  for example, messages in zip(examples, CONVERSATIONS[1:]):
    rendered = chat_template.render(ours, messages)
    assert list(example['targets']) == rendered.tokens[1:]
    assert list(example['weights']) == rendered.weights[1:]
  if style == 'mistral':  # its template requires alternating roles
    twice = [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'},
             {'role': 'assistant', 'content': 'c'}]
    with pytest.raises(chat_template.ConversationError, match='conversation 2: the chat '
                       'template refuses this conversation: After the optional system message'):
      chat_data.encode(ours, [CONVERSATIONS[1], twice], seq_len=256)


def test_a_tokenizer_without_a_template_gets_gpt_jax_template_after_bos(tmp_path):
  directory = hf_tokenizers.build(str(tmp_path / 'base'), 'llama3', chat_template=False)
  base = tokenizer_lib.HuggingFaceTokenizer.from_directory(directory)
  assert not chat_template.has_chat_tokens(base)
  tokenizer = chat_template.add_chat_tokens(base)
  tokenizer.save(str(tmp_path / 'saved'))
  tokenizer = tokenizer_lib.load(str(tmp_path / 'saved'))
  rendered = chat_template.render(tokenizer, CONVERSATIONS[1])
  user, end = (tokenizer_lib.special_token_id(tokenizer, t) for t in ('<|user|>', '<|end|>'))
  opening = [base.bos_id, user] + base.encode_text('Hi!') + [end]
  assert rendered.tokens[:len(opening)] == opening and rendered.weights[:len(opening)] == [0] * len(
      opening)
  assert tokenizer.decode(rendered.tokens) == 'Hi!Hello.'
