r"""Chat with a workdir fine-tuned for chat: replies stream as they are generated.

  python -m gpt_jax.chat --workdir=runs/sft                        # interactive
  python -m gpt_jax.chat --workdir=runs/sft --system="Answer in one sentence."
  python -m gpt_jax.chat --workdir=runs/sft --message="How do I resume a run?" --temperature=0
  printf 'Hi\nHow do I resume a run?\n' | python -m gpt_jax.chat --workdir=runs/sft
  python -m gpt_jax.chat --workdir=runs/sft --message=- < question.txt

With --message, the binary prints the assistant's reply alone and exits (--message=- reads the
message from stdin). Otherwise every line read is a user turn of one conversation: /reset starts
the conversation over, /exit (or end of input) quits. Replies go to stdout and notices to
stderr, so a script that pipes lines in reads only the replies (one per turn, each ending with a
newline); in a terminal the prompt is `> `, with line editing.

Each turn renders the system prompt, the history and the new message with the chat template
(gpt_jax.chat_template) and generates until the end-of-turn token (or another of the template's
markers, or --max_new_tokens). The history must fit the model's context with room left for the
reply, min(--max_new_tokens, half the context): the oldest turns are dropped, with a notice,
until it does. The reply may then use all the context that is left, up to --max_new_tokens.
"""

import os
import sys
from collections.abc import Iterator

from absl import app, flags, logging

from gpt_jax import chat_template, checkpoint, cli, decode, quantize, sample, sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

FLAGS = flags.FLAGS

COMMANDS = {'/reset': 'start the conversation over', '/exit': 'quit'}


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A workdir fine-tuned for chat (gpt_jax.finetune).')
  flags.DEFINE_string('system', '', 'System prompt, kept at the start of the conversation.')
  flags.DEFINE_string('message', None, 'Send this one message, print the reply and exit '
                      '("-": read the message from stdin).')
  flags.DEFINE_integer('max_new_tokens', 256, 'Most tokens in one reply.')
  flags.DEFINE_float('temperature', 0.7, 'Softmax temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass, in (0, 1] (1.0: off).')
  flags.DEFINE_float('repetition_penalty', 1.0, 'Penalise tokens already in the conversation '
                     '(> 1 discourages repeats; 1.0: off).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed and messages give the same '
                       'replies.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_enum('quantize', 'none', quantize.MODES, quantize.MODES_HELP)
  cli.define_mesh_flag()


def stop_ids(tokenizer) -> set[int]:
  """Tokens that end the assistant's turn: its end-of-turn, any other template marker (the model
  starting someone else's turn), and end-of-text."""
  return chat_template.stop_ids(tokenizer)


class Chat:
  """One conversation with a model: its history, the context budget, streamed replies."""

  def __init__(self, generator: decode.Generator, tokenizer, system: str = '',
               max_new_tokens: int = 256, seed: int = 0, **sampling):
    if max_new_tokens <= 0:
      raise ConfigError(f'max_new_tokens must be positive, got {max_new_tokens}')
    decode.check_sampling(**sampling)
    self.generator, self.tokenizer = generator, tokenizer
    self.end_of_turn = chat_template.end_of_turn_id(tokenizer)  # error if no chat tokens
    self.stop = stop_ids(tokenizer)
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


# ------------------------------------------------------------------ the binary


def load_chat(workdir: str, step: int | None = None, quantize_mode: str = 'none',
              mesh: str = '', **kwargs) -> tuple[Chat, int]:
  """(a Chat with the workdir's model, its checkpoint step); kwargs as Chat. quantize_mode:
  one of gpt_jax.quantize.MODES; mesh: as --mesh (sharding.inference_placement)."""
  config = checkpoint.load_config(workdir)  # a clear error before the tokenizer's
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  chat_template.end_of_turn_id(tokenizer)  # no chat tokens: say so before loading the model
  placement = sharding.inference_placement(mesh, config.mesh)
  model_cfg, params, step = checkpoint.load_model(workdir, step, placement)
  generator = quantize.generator(model_cfg, quantize.apply(params, quantize_mode),
                                 tokenizer.vocab_size, placement=placement)
  return Chat(generator, tokenizer, **kwargs), step


def _notice(text: str) -> None:
  print(f'[{text}]', file=sys.stderr, flush=True)


def _print_reply(chat: Chat, message: str) -> None:
  dropped, pieces = chat.send(message)
  if dropped:
    _notice(f'dropped the oldest {dropped} turn{"s" * (dropped > 1)} of the conversation to fit '
            f'the model\'s context of {chat.context} tokens')
  try:
    for piece in pieces:
      sys.stdout.write(piece)
      sys.stdout.flush()
  finally:
    pieces.close()
    sys.stdout.write('\n')
    sys.stdout.flush()


def _read_line(interactive: bool) -> str | None:
  """The next line of input without its newline, or None at the end of input."""
  if not interactive:
    line = sys.stdin.readline()
    return line.rstrip('\n') if line else None
  try:
    return input('> ')  # with line editing (readline)
  except EOFError:
    sys.stdout.write('\n')
    return None


def repl(chat: Chat, interactive: bool) -> None:
  """One user turn per line of stdin; /reset and /exit are commands."""
  if interactive:
    _notice(f'context {chat.context} tokens; '
            + ', '.join(f'{c}: {what}' for c, what in COMMANDS.items()))
  while True:
    message = _read_line(interactive)
    if message is None:
      return
    command = message.strip()
    if command == '/exit':
      return
    if command == '/reset':
      chat.reset()
      _notice('conversation reset')
      continue
    if command.startswith('/') and command.split()[0] not in COMMANDS:
      _notice(f'unknown command {command.split()[0]}; '
              + ', '.join(f'{c}: {what}' for c, what in COMMANDS.items()))
      continue
    if not command:
      continue
    try:
      _print_reply(chat, message)
    except ConfigError as e:  # e.g. a message longer than the context: the chat goes on
      _notice(f'error: {e}')
    except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
      if not interactive:
        raise
      _notice('interrupted')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.skip_absent_tpu()
  cli.quiet_logs(logging.ERROR)
  with cli.one_line_errors():
    sample.check_generation_flags(FLAGS)
    message = FLAGS.message
    if message == '-':
      message = sys.stdin.read()
    if message is not None and not message.strip():
      raise ConfigError('--message is empty')
    chat, _ = load_chat(
        FLAGS.workdir, FLAGS.step, FLAGS.quantize, FLAGS.mesh, system=FLAGS.system,
        max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty)
    if message is not None:
      _print_reply(chat, message)
      return
  interactive = sys.stdin.isatty()
  if interactive:
    import readline  # noqa: F401  gives input() line editing and history
  try:
    repl(chat, interactive)
  except KeyboardInterrupt:
    sys.stderr.write('\n')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
