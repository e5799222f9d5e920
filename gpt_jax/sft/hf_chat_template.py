"""A Hugging Face model's own chat template: its Jinja `chat_template`, rendered as transformers'
`apply_chat_template` renders it, and the assistant-only loss weights of the rendered text.

Rendering: a sandboxed Jinja environment with transformers' settings (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
characters, `{% generation %}` blocks rendered as they are), given `messages`,
`add_generation_prompt` and the tokenizer's named tokens (`bos_token`, `eos_token`, ...). The
text is tokenized without adding BOS/EOS (the template writes them), and special tokens written
in it, by the template or in a message, are matched: the same ids as `apply_chat_template`.

Loss weights: each assistant message's span in the rendered text runs from its content (found
after what the conversation up to it renders with a generation prompt, when that is a prefix of
the whole; else after the contents of the messages before it) to the end of the first special token
after the content (the template's end of turn: `<|eot_id|>`, `<|im_end|>`, `</s>`); the tokens
that overlap a span have weight 1. A template that does not write an assistant message's
content verbatim (whitespace trimmed aside) is refused for training.
"""

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox

from gpt_jax.errors import ConfigError


class TemplateError(ConfigError):
  """A conversation the template refuses (raise_exception) or cannot render."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the body."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ConfigError(f"The tokenizer's chat_template is not valid Jinja: {e.message} (line "
                      f'{e.lineno})') from None


def render_text(tokenizer, messages, add_generation_prompt: bool = False) -> str:
  """The template's text for `messages` (dicts with 'role' and 'content')."""
  try:
    return _compile(tokenizer.chat_template).render(
        messages=[dict(m) for m in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise TemplateError(f'the chat template refuses this conversation: {e}') from None


def _assistant_spans(tokenizer, messages, text: str, ids, offsets) -> list[tuple[int, int]]:
  """[start, end) characters of each assistant message's content and end-of-turn token."""
  spans, cursor = [], 0  # cursor: past the content of the messages so far
  for i, message in enumerate(messages):
    content = message['content'].strip()
    if message['role'] == 'user':
      found = text.find(content, cursor)
      cursor = cursor if found < 0 else found + len(content)
    if message['role'] != 'assistant':
      continue  # (a system message may be written anywhere: Mistral's, in the last user turn)
    prefix = render_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ''
    start = max(len(prefix), cursor) if text.startswith(prefix) else cursor
    found = text.find(content, start)
    if found < 0:
      raise TemplateError(f"the chat template does not write assistant message {i}'s content "
                          'as it is, so its tokens cannot be told apart for training')
    end = found + len(content)
    # Through the first special token after the content: the template's end of the turn.
    for token, (token_start, token_end) in zip(ids, offsets):
      if token_start >= end and tokenizer.is_special(token):
        end = token_end
        break
    spans.append((found, end))
    cursor = end
  return spans


def render(tokenizer, messages, add_generation_prompt: bool = False):
  """(tokens, weights): weights 1 on the assistant messages' tokens and their end of turn."""
  text = render_text(tokenizer, messages, add_generation_prompt)
  ids, offsets = tokenizer.encode_with_offsets(text)
  if add_generation_prompt:  # a prompt to answer, not to learn from
    return ids, [0] * len(ids)
  spans = _assistant_spans(tokenizer, messages, text, ids, offsets)
  weights = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
             for start, end in offsets]
  return ids, weights


@functools.lru_cache(maxsize=8)
def _end_of_turn(tokenizer) -> int | None:
  probe = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
  ids, weights = render(tokenizer, probe)
  last = max((i for i, w in enumerate(weights) if w), default=None)
  if last is not None and tokenizer.is_special(ids[last]):
    return ids[last]
  return tokenizer.eos_id


def end_of_turn_id(tokenizer) -> int:
  """The token that ends an assistant's turn in this template (the first special token after
  the content), or else EOS."""
  token = _end_of_turn(tokenizer)
  if token is None:
    raise ConfigError("The tokenizer's chat template ends an assistant turn with no special "
                      'token and the tokenizer has no EOS: generation could not stop')
  return token


def stop_ids(tokenizer) -> set[int]:
  """Every special token (the end of the turn, the model starting another turn, end of text)."""
  return set(tokenizer.special_ids) | {end_of_turn_id(tokenizer)} | ({tokenizer.eos_id} - {None})
