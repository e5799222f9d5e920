"""Conversations: the JSONL format, validation, and the chat template that renders them to tokens.

A conversation is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
one per line of a JSONL file. The template gives each turn a role marker and an end-of-turn
marker, all special tokens (so no user text can forge them):

  <|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

A generation prompt ends with `<|assistant|>`; the model's turn ends when it emits `<|end|>`.
Training weights select the assistant's content and its `<|end|>`: the loss is on those only.

A model whose Hugging Face tokenizer ships its own Jinja chat template uses that one instead
(gpt_jax/sft/hf_chat_template.py): the functions here serve both.
"""

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence

from gpt_jax.sft import hf_chat_template
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

ROLES = tokenizer_lib.CHAT_ROLES
SPECIAL_TOKENS = tokenizer_lib.CHAT_TOKENS
ROLE_TOKENS = dict(zip(ROLES, SPECIAL_TOKENS))
END_OF_TURN = SPECIAL_TOKENS[-1]

Message = dict[str, str]


class ConversationError(ConfigError):
  """A conversation that does not follow the format; the message names the problem."""


def add_chat_tokens(tokenizer: tokenizer_lib.Tokenizer) -> tokenizer_lib.WithSpecialTokens:
  """`tokenizer` with the template's special tokens (ids after its vocabulary)."""
  return tokenizer_lib.add_special_tokens(tokenizer, SPECIAL_TOKENS)


def uses_hf_template(tokenizer: tokenizer_lib.Tokenizer) -> bool:
  """Whether the tokenizer brings its own (Hugging Face, Jinja) chat template."""
  return bool(getattr(tokenizer, 'chat_template', None))


def has_chat_tokens(tokenizer: tokenizer_lib.Tokenizer) -> bool:
  """Whether conversations can be rendered: the tokenizer's own template, or this one's tokens."""
  return uses_hf_template(tokenizer) or bool(added_token_ids(tokenizer))


def added_token_ids(tokenizer: tokenizer_lib.Tokenizer) -> tuple[int, ...]:
  """The ids of this template's special tokens, when the tokenizer has them all; else ()."""
  return tokenizer_lib.chat_token_ids(tokenizer)


def stop_ids(tokenizer) -> set[int]:
  """Tokens that end the assistant's turn: its end-of-turn, any other template marker (the model
  starting someone else's turn), and end-of-text."""
  if uses_hf_template(tokenizer):
    return hf_chat_template.stop_ids(tokenizer)
  ids = {tokenizer_lib.special_token_id(tokenizer, t) for t in SPECIAL_TOKENS}
  ids.add(tokenizer.eos_id)
  return {i for i in ids if i is not None}


def _id(tokenizer, token: str) -> int:
  token_id = tokenizer_lib.special_token_id(tokenizer, token)
  if token_id is None:
    raise ConfigError('This tokenizer has no chat template tokens: the model was not fine-tuned '
                      'for chat (python -m gpt_jax.finetune adds them).')
  return token_id


def end_of_turn_id(tokenizer) -> int:
  """The token that ends an assistant's turn: generation stops on it."""
  if uses_hf_template(tokenizer):
    return hf_chat_template.end_of_turn_id(tokenizer)
  return _id(tokenizer, END_OF_TURN)


def check_messages(messages, *, needs_assistant: bool = False) -> list[Message]:
  """The messages, or ConversationError naming what is wrong with them."""
  if not isinstance(messages, list) or not messages:
    raise ConversationError('"messages" must be a non-empty list')
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ConversationError(f'message {i} is not an object')
    role, content = message.get('role'), message.get('content')
    if role not in ROLES:
      raise ConversationError(f'message {i} has role {role!r}; roles are {list(ROLES)}')
    if not isinstance(content, str):
      raise ConversationError(f'message {i} ({role}) has content of type '
                              f'{type(content).__name__}; it must be a string')
  if needs_assistant and not any(m['role'] == 'assistant' for m in messages):
    raise ConversationError('the conversation has no assistant message to learn from')
  return [{'role': m['role'], 'content': m['content']} for m in messages]


@dataclasses.dataclass
class Rendered:
  tokens: list[int]
  weights: list[int]  # 1 where the token is the assistant's (content or end of turn)


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
           ) -> Rendered:
  """Tokens of the conversation; with add_generation_prompt, it ends opening the assistant turn.

  A template the conversation does not suit (the tokenizer's own may refuse, e.g., roles that
  do not alternate) raises ConversationError."""
  if uses_hf_template(tokenizer):
    try:
      return Rendered(*hf_chat_template.render(tokenizer, messages, add_generation_prompt))
    except hf_chat_template.TemplateError as e:
      raise ConversationError(str(e)) from None
  end = end_of_turn_id(tokenizer)
  tokens, weights = [], []
  bos = getattr(tokenizer, 'bos_id', None)
  if bos is not None and tokenizer.encode('')[:1] == [bos]:  # a tokenizer that opens with BOS
    tokens, weights = [bos], [0]
  for message in messages:
    content = tokenizer.encode_text(message['content'])
    learn = int(message['role'] == 'assistant')
    tokens += [_id(tokenizer, ROLE_TOKENS[message['role']])] + content + [end]
    weights += [0] + [learn] * (len(content) + 1)
  if add_generation_prompt:
    tokens.append(_id(tokenizer, ROLE_TOKENS['assistant']))
    weights.append(0)
  return Rendered(tokens, weights)


def read_conversations(path: str, on_error: str = 'skip', skip_hint: str = 'on_error=skip'
                       ) -> Iterator[list[Message]]:
  """The conversations of a JSONL file. A malformed line is reported with its number, then
  skipped (on_error='skip', a warning on stderr) or fatal (on_error='raise'; the error ends
  saying how to skip such lines instead: `skip_hint`)."""
  if on_error not in ('skip', 'raise'):
    raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConversationError(f'bad JSON ({e.msg} at column {e.colno})') from None
        if not isinstance(record, dict) or 'messages' not in record:
          raise ConversationError('expected an object with a "messages" list')
        yield check_messages(record['messages'], needs_assistant=True)
      except ConversationError as e:
        message = f'{path}:{number}: {e}'
        if on_error == 'raise':
          raise ConversationError(f'{message} (skip malformed lines with {skip_hint})') from None
        print(f'warning: skipped {message}', file=sys.stderr, flush=True)
