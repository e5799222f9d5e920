"""A conversation with a chat model: the history within the context, streamed replies.

Each turn renders the system prompt, the history and the new message with the chat template
(gpt_jax/sft/chat_template.py) and generates until the end-of-turn token (or another of the
template's markers, or max_new_tokens). The history must fit the model's context with room left
for the reply, min(max_new_tokens, half the context): the oldest turns are dropped until it
does. The reply may then use all the context that is left, up to max_new_tokens.
"""

import os
from collections.abc import Iterator

from gpt_jax import checkpoint, decode, sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.inference import quantize
from gpt_jax.sft import chat_template


class Chat:
  """One conversation with a model: its history, the context budget, streamed replies."""

  def __init__(self, generator: decode.Generator, tokenizer, system: str = '',
               max_new_tokens: int = 256, seed: int = 0, **sampling):
    if max_new_tokens <= 0:
      raise ConfigError(f'max_new_tokens must be positive, got {max_new_tokens}')
    decode.check_sampling(**sampling)
    self.generator, self.tokenizer = generator, tokenizer
    self.end_of_turn = chat_template.end_of_turn_id(tokenizer)  # error if no chat tokens
    self.stop = chat_template.stop_ids(tokenizer)
    self.system = [{'role': 'system', 'content': system}] if system else []
    self.max_new_tokens, self.seed, self.sampling = max_new_tokens, seed, sampling
    self.context = generator.cfg.max_len
    self.turns = 0  # replies so far, across resets: each turn samples with its own seed
    self.reset()

  def reset(self) -> None:
    self.history: list[tuple[str, str]] = []  # (user, assistant) turns, oldest first

  def _prompt(self, message: str) -> list[int]:
    messages = list(self.system)
    for user, assistant in self.history:
      messages += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
    messages.append({'role': 'user', 'content': message})
    return chat_template.render(self.tokenizer, messages, add_generation_prompt=True).tokens

  def send(self, message: str) -> tuple[int, Iterator[str]]:
    """(turns dropped from the history to fit the context, the reply's text pieces).

    The turn joins the history once the pieces have been read (all of them, or as many as were
    read when the iterator is closed: an interrupted reply stays as far as it was shown).
    """
    history, self.history = self.history, []
    alone = len(self._prompt(message))
    self.history = history
    if alone >= self.context:  # the history stays: the next message may fit
      what = 'The system prompt and the message take' if self.system else 'The message takes'
      raise ConfigError(f'{what} {alone} tokens: no room for a reply in the model\'s context '
                        f'of {self.context} tokens')
    reply_room = min(self.max_new_tokens, self.context // 2)
    dropped = 0
    prompt = self._prompt(message)
    while self.history and len(prompt) + reply_room > self.context:
      self.history.pop(0)
      dropped += 1
      prompt = self._prompt(message)
    budget = min(self.max_new_tokens, self.context - len(prompt))
    tokens = self.generator.stream([prompt], budget, eos_id=self.end_of_turn,
                                   seed=self.seed + self.turns, **self.sampling)
    self.turns += 1
    return dropped, self._pieces(message, tokens)

  def _pieces(self, message: str, tokens) -> Iterator[str]:
    reply, text = [], ''
    try:
      for step_tokens in tokens:
        token = int(step_tokens[0])
        if token == decode.PAD or token in self.stop:
          break
        reply.append(token)
        new = self.tokenizer.decode(reply)
        if not new.endswith('\ufffd'):  # a character split across tokens: wait for the rest
          yield new[len(text):]
          text = new
      new = self.tokenizer.decode(reply)
      if new[len(text):]:
        yield new[len(text):]
      text = new
    finally:
      self.history.append((message, text))

  def reply(self, message: str) -> str:
    """The whole reply (the history is updated as with send)."""
    return ''.join(self.send(message)[1])


def load_chat(workdir: str, step: int | None = None, quantize_mode: str = 'none',
              mesh: str = '', **kwargs) -> tuple[Chat, int]:
  """(a Chat with the workdir's model, its checkpoint step); kwargs as Chat. quantize_mode:
  one of gpt_jax.inference.quantize.MODES; mesh: as --mesh (sharding.inference_placement)."""
  config = checkpoint.load_config(workdir)  # a clear error before the tokenizer's
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  chat_template.end_of_turn_id(tokenizer)  # no chat tokens: say so before loading the model
  placement = sharding.inference_placement(mesh, config.mesh)
  model_cfg, params, step = checkpoint.load_model(workdir, step, placement)
  generator = quantize.generator(model_cfg, quantize.apply(params, quantize_mode),
                                 tokenizer.vocab_size, placement=placement)
  return Chat(generator, tokenizer, **kwargs), step
