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

How turns fit the context: gpt_jax/inference/conversation.py (dropped turns get a notice).
"""

import sys

from absl import app, flags, logging

from gpt_jax import cli
from gpt_jax.errors import ConfigError
from gpt_jax.inference import conversation, quantize

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


def _notice(text: str) -> None:
  print(f'[{text}]', file=sys.stderr, flush=True)


def _print_reply(chat: conversation.Chat, message: str) -> None:
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


def repl(chat: conversation.Chat, interactive: bool) -> None:
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
    cli.check_generation_flags(FLAGS)
    message = FLAGS.message
    if message == '-':
      message = sys.stdin.read()
    if message is not None and not message.strip():
      raise ConfigError('--message is empty')
    chat, _ = conversation.load_chat(
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
