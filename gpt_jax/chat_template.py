"""Conversations: the JSONL format, validation, and the chat template that renders them to tokens.

A conversation is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
one per line of a JSONL file. The template gives each turn a role marker and an end-of-turn
marker, all special tokens (so no user text can forge them):

  <|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

A generation prompt ends with `<|assistant|>`; the model's turn ends when it emits `<|end|>`.
Training weights select the assistant's content and its `<|end|>`: the loss is on those only.
"""

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

ROLES = ('system', 'user', 'assistant')
ROLE_TOKENS = {role: f'<|{role}|>' for role in ROLES}
END_OF_TURN = '<|end|>'
SPECIAL_TOKENS = tuple(ROLE_TOKENS.values()) + (END_OF_TURN,)

Message = dict[str, str]


class ConversationError(ConfigError):
  """A conversation that does not follow the format; the message names the problem."""


def add_chat_tokens(tokenizer: tokenizer_lib.Tokenizer) -> tokenizer_lib.WithSpecialTokens:
  """`tokenizer` with the template's special tokens (ids after its vocabulary)."""
  return tokenizer_lib.add_special_tokens(tokenizer, SPECIAL_TOKENS)


def has_chat_tokens(tokenizer: tokenizer_lib.Tokenizer) -> bool:
  return all(tokenizer_lib.special_token_id(tokenizer, t) is not None for t in SPECIAL_TOKENS)


def _id(tokenizer, token: str) -> int:
  token_id = tokenizer_lib.special_token_id(tokenizer, token)
  if token_id is None:
    raise ConfigError('This tokenizer has no chat template tokens: the model was not fine-tuned '
                      'for chat (python -m gpt_jax.finetune adds them).')
  return token_id


def end_of_turn_id(tokenizer) -> int:
  """The token that ends an assistant's turn: generation stops on it."""
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
  """Tokens of the conversation; with add_generation_prompt, it ends opening the assistant turn."""
  end = end_of_turn_id(tokenizer)
  tokens, weights = [], []
  for message in messages:
    content = tokenizer.encode(message['content'])
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
