r"""Evaluate a workdir's parameters on a whole split (loss, perplexity and bits per byte), or a
chat model's answers to held-out conversations (BLEU, ROUGE-L and the assistant-token loss).

  python -m gpt_jax.eval --workdir=runs/default                       # config.data.val_split
  python -m gpt_jax.eval --workdir=runs/default --split=train
  python -m gpt_jax.eval --workdir=runs/gpt2 --text_files='books/*.txt' --split=validation
  python -m gpt_jax.eval --workdir=runs/sft --chat_files='data/faq/heldout.jsonl'

Restores only the parameters (latest or --step), rebuilds the model and tokenizer from the
workdir, and reads the split through gpt_jax.data (the workdir's dataset, or --text_files with
the text_files builder: `validation` is the last data.val_fraction of each file). The split's
token stream (documents joined by EOS, as in training) is cut into windows of --seq_len tokens;
every token but the first is predicted exactly once, from the tokens before it in its window.

  loss           mean cross-entropy in nats per predicted token
  perplexity     exp(loss)
  bits_per_byte  total nats / (ln 2 x UTF-8 bytes of the split's text): comparable across
                 tokenizers (EOS predictions count in the numerator, as in training)

Batches are sharded over all local devices (data parallel, parameters replicated). The result
is printed and written to <workdir>/eval/<dataset>-<split>-step<step>.json.

With --chat_files (JSONL conversations, gpt_jax.sft.chat_template's format), each conversation is
cut before its last assistant message: the model answers the rest (rendered with the generation
prompt) greedily, until its end-of-turn or --max_new_tokens, in batches of --batch_size prompts,
and the answers are scored against that last message's content:

  bleu            sacrebleu's corpus BLEU (0-100)
  rouge_l         mean ROUGE-L F-measure (rouge_score, 0-100)
  exact_match     fraction of answers equal to the reference (surrounding spaces ignored)
  assistant_loss  mean cross-entropy (nats) on the tokens fine-tuning learns from: every
                  assistant message's content and end-of-turn, of the whole conversations

An answer may use the context its prompt leaves, up to --max_new_tokens; a prompt that leaves
less than a quarter of the context loses its first tokens (counted in truncated_prompts); a
conversation longer than the context is scored on its last max_len + 1
tokens for the loss. Written to <workdir>/eval/chat-<files>-step<step>.json, with every prompt,
reference and answer in the .samples.jsonl beside it.
"""

import contextlib
import glob
import json
import math
import os
import re
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from gpt_jax import checkpoint, cli, data, decode, sharding
from gpt_jax.sft import chat_template
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import Transformer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when run, so the module imports beside other binaries)."""
  flags.DEFINE_string('workdir', None, 'A gpt_jax workdir (trained or converted).')
  flags.DEFINE_string('split', '', 'Split to evaluate ("": config.data.val_split).')
  flags.DEFINE_string('text_files', '', 'Evaluate on these local text files (a glob) instead '
                      "of the workdir's dataset.")
  flags.DEFINE_integer('seq_len', 0, 'Tokens per window (0: config.data.seq_len).')
  flags.DEFINE_integer('batch_size', 0, 'Windows per batch (0: config.data.batch_size); '
                       'rounded up to a multiple of the mesh\'s batch shards (data x fsdp).')
  flags.DEFINE_string('tfds_data_dir', None, "TFDS data dir (default: the workdir config's).")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')
  flags.DEFINE_string('chat_files', '', 'Score greedy answers to these conversations (a glob '
                      'of JSONL files) instead of the loss on a split.')
  flags.DEFINE_integer('max_new_tokens', 128, 'With --chat_files: most tokens in one answer.')
  cli.define_mesh_flag()


def windows(tokens: np.ndarray, seq_len: int, batch_size: int):
  """Batches {'inputs', 'targets', 'weights'} [batch_size, seq_len] covering tokens[1:] once.

  Window w predicts tokens[w * seq_len + 1 : (w + 1) * seq_len + 1]; the last window and the
  last batch are padded with weight 0.
  """
  num_windows = -(-(len(tokens) - 1) // seq_len)
  for first in range(0, num_windows, batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ('inputs', 'targets')}
    batch['weights'] = np.zeros((batch_size, seq_len), np.float32)
    for row, w in enumerate(range(first, min(first + batch_size, num_windows))):
      start = w * seq_len
      inputs = tokens[start:start + seq_len]
      targets = tokens[start + 1:start + seq_len + 1]
      batch['inputs'][row, :len(inputs)] = inputs
      batch['targets'][row, :len(targets)] = targets
      batch['weights'][row, :len(targets)] = 1
    yield batch


def evaluate(workdir: str, split: str = '', text_files: str = '', seq_len: int = 0,
             batch_size: int = 0, step: int | None = None, tfds_data_dir: str | None = None,
             progress_bar: bool = False, mesh: str = '') -> dict:
  """Evaluates and writes the result JSON; returns the result. mesh: as --mesh."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist')
  config = checkpoint.load_config(workdir)
  data_config = config.data
  if text_files:
    if not glob.glob(os.path.expanduser(text_files), recursive=True):
      raise FileNotFoundError(f'--text_files {text_files!r} matches no files')
    data_config.text_files = text_files
  if tfds_data_dir is not None:
    data_config.tfds_data_dir = tfds_data_dir
  split = split or data_config.val_split
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  placement = sharding.inference_placement(mesh, config.mesh)
  model_cfg, params, step = checkpoint.load_model(workdir, step, placement)
  seq_len = seq_len or min(data_config.seq_len, model_cfg.max_len)
  if not 0 < seq_len <= model_cfg.max_len:
    raise ConfigError(f'--seq_len must be in [1, {model_cfg.max_len}] (the model\'s context), '
                      f'got {seq_len}')
  batch_size = batch_size or data_config.batch_size
  if batch_size <= 0:
    raise ConfigError(f'--batch_size must be positive, got {batch_size}')
  batch_size = placement.rows(batch_size)

  tokens = data.token_stream(data_config, tokenizer, workdir, split)
  if len(tokens) < 2:
    raise ConfigError(f'Split {split!r} has {len(tokens)} tokens: nothing to predict')
  num_bytes = sum(len(text.encode('utf-8')) for text in data.open_texts(data_config, split))

  rows = placement.sharding('batch', 'length')
  model = Transformer(model_cfg)

  @jax.jit
  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(losses * batch['weights'])

  total_windows = -(-(len(tokens) - 1) // seq_len)
  progress = tqdm.tqdm(total=-(-total_windows // batch_size), unit='batch', dynamic_ncols=True,
                       disable=not progress_bar, desc=f'eval {split}')
  start = time.perf_counter()
  loss_sum = 0.0
  for batch in windows(tokens, seq_len, batch_size):
    with placement.activate():
      loss_sum += float(eval_step(params, jax.device_put(batch, rows)))
    progress.update()
  progress.close()

  count = len(tokens) - 1
  loss = loss_sum / count
  name = data_config.text_files and 'text_files' or data_config.tfds_name
  result = {
      'step': int(step), 'dataset': name, 'split': split, 'text_files': data_config.text_files,
      'loss': loss, 'perplexity': math.exp(min(loss, 700)),
      'bits_per_byte': loss_sum / (math.log(2) * num_bytes) if num_bytes else None,
      'loss_sum': loss_sum, 'tokens': count, 'bytes': num_bytes, 'seq_len': seq_len,
      'batch_size': batch_size, 'devices': placement.num_devices,
      'mesh': dict(placement.mesh.shape),
      'seconds': round(time.perf_counter() - start, 3),
  }
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, re.sub(r'[^\w.-]', '_', f'{name}-{split}-step{step}') + '.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  result['path'] = path
  return result


# ------------------------------------------------------------------ chat answers


def read_chat_examples(chat_files: str) -> list[tuple[list[dict], str, list[dict]]]:
  """(prompt messages, reference answer, whole conversation) of each conversation in the files:
  the prompt is the conversation before its last assistant message, which is the reference."""
  paths = sorted(glob.glob(os.path.expanduser(chat_files), recursive=True))
  if not paths:
    raise FileNotFoundError(f'--chat_files {chat_files!r} matches no files')
  examples = []
  for path in paths:
    for messages in chat_template.read_conversations(path, on_error='raise'):
      last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
      examples.append((messages[:last], messages[last]['content'], messages))
  if not examples:
    raise ConfigError(f'--chat_files {chat_files!r} hold no conversations')
  return examples


def _batches(items: list, batch_size: int):
  """Lists of batch_size items; the last is filled up with copies of its last item, so every
  batch has the same shape (one compiled program)."""
  for first in range(0, len(items), batch_size):
    batch = items[first:first + batch_size]
    yield batch + [batch[-1]] * (batch_size - len(batch)), len(batch)


def assistant_loss(model_cfg, params, conversations: list[chat_template.Rendered],
                   batch_size: int, progress_bar: bool = False,
                   placement: sharding.Placement | None = None) -> tuple[float, float]:
  """(total nats, tokens) of the weighted (assistant) tokens of rendered conversations; one longer
  than the context is scored on its last max_len + 1 tokens. With a placement, batch_size must
  be a multiple of its batch shards."""
  length = min(model_cfg.max_len, max(len(c.tokens) for c in conversations) - 1)
  model = Transformer(model_cfg)

  @jax.jit
  def loss_sums(params, tokens, weights):
    logits, _ = model.apply({'params': params}, tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(losses * weights[:, 1:]), jnp.sum(weights[:, 1:])

  loss_sum, count = 0.0, 0.0
  for batch, used in tqdm.tqdm(list(_batches(conversations, batch_size)), unit='batch',
                               dynamic_ncols=True, disable=not progress_bar, desc='loss'):
    tokens = np.zeros((batch_size, length + 1), np.int32)
    weights = np.zeros((batch_size, length + 1), np.float32)
    for row, conversation in enumerate(batch[:used]):
      kept = slice(-(length + 1), None)
      tokens[row, :len(conversation.tokens[kept])] = conversation.tokens[kept]
      weights[row, :len(conversation.weights[kept])] = conversation.weights[kept]
    with placement.activate() if placement else contextlib.nullcontext():
      batch_loss, batch_count = loss_sums(params, tokens, weights)
    loss_sum, count = loss_sum + float(batch_loss), count + float(batch_count)
  return loss_sum, count


def generate_answers(generator: decode.Generator, tokenizer, prompts: list[list[int]],
                     max_new_tokens: int, batch_size: int, progress_bar: bool = False
                     ) -> tuple[list[str], int]:
  """(greedy answer to each prompt, how many prompts lost their first tokens to fit).

  An answer ends at the end-of-turn token (or any of the template's markers, or end-of-text);
  it may use the context the prompt leaves, up to max_new_tokens. A prompt that leaves less than
  min(max_new_tokens, a quarter of the context) loses its first tokens to leave that much.
  """
  context = generator.cfg.max_len
  least = min(max_new_tokens, context // 4)
  room = [max(min(max_new_tokens, context - len(p)), least) for p in prompts]
  stops = chat_template.stop_ids(tokenizer)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
  answers = [''] * len(prompts)
  for rows, used in tqdm.tqdm(list(_batches(order, batch_size)), unit='batch',
                              dynamic_ncols=True, disable=not progress_bar, desc='generate'):
    outputs = generator.generate([prompts[i] for i in rows], [room[i] for i in rows],
                                 eos_id=chat_template.end_of_turn_id(tokenizer), truncate=True,
                                 temperature=0)
    for i, tokens in zip(rows[:used], outputs):
      ends = [n for n, t in enumerate(tokens) if t in stops]
      answers[i] = tokenizer.decode(tokens[:ends[0]] if ends else tokens)
  return answers, sum(len(p) + n > context for p, n in zip(prompts, room))


def evaluate_chat(workdir: str, chat_files: str, max_new_tokens: int = 128, batch_size: int = 0,
                  step: int | None = None, progress_bar: bool = False, mesh: str = '') -> dict:
  """Scores greedy answers to the conversations and writes the result JSON; returns the result."""
  from rouge_score import rouge_scorer  # imports nltk (seconds): only the chat mode needs it
  import sacrebleu
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist')
  if max_new_tokens <= 0:
    raise ConfigError(f'--max_new_tokens must be positive, got {max_new_tokens}')
  config = checkpoint.load_config(workdir)
  batch_size = batch_size or config.data.batch_size
  if batch_size <= 0:
    raise ConfigError(f'--batch_size must be positive, got {batch_size}')
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  chat_template.end_of_turn_id(tokenizer)  # no chat tokens: say so before loading anything
  examples = read_chat_examples(chat_files)
  placement = sharding.inference_placement(mesh, config.mesh)
  batch_size = placement.rows(batch_size)
  model_cfg, params, step = checkpoint.load_model(workdir, step, placement)

  start = time.perf_counter()
  conversations = [chat_template.render(tokenizer, whole) for _, _, whole in examples]
  loss_sum, count = assistant_loss(model_cfg, params, conversations, batch_size, progress_bar,
                                   placement)
  prompts = [chat_template.render(tokenizer, prompt, add_generation_prompt=True).tokens
             for prompt, _, _ in examples]
  generator = decode.Generator(model_cfg, params, tokenizer.vocab_size, placement=placement)
  answers, truncated = generate_answers(generator, tokenizer, prompts, max_new_tokens, batch_size,
                                        progress_bar)
  references = [reference for _, reference, _ in examples]
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  rouge_l = [scorer.score(ref, answer)['rougeL'].fmeasure for ref, answer in
             zip(references, answers)]

  name = re.sub(r'[^\w.-]', '_', os.path.basename(chat_files).removesuffix('.jsonl'))
  result = {
      'step': int(step), 'chat_files': chat_files, 'conversations': len(examples),
      'bleu': sacrebleu.corpus_bleu(answers, [references]).score,
      'rouge_l': 100 * float(np.mean(rouge_l)),
      'exact_match': float(np.mean([a.strip() == r.strip() for a, r in zip(answers, references)])),
      'assistant_loss': loss_sum / count if count else None, 'assistant_tokens': int(count),
      'truncated_prompts': truncated, 'max_new_tokens': max_new_tokens,
      'batch_size': batch_size, 'seconds': round(time.perf_counter() - start, 3),
  }
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'chat-{name}-step{step}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  samples_path = path.removesuffix('.json') + '.samples.jsonl'
  with open(samples_path, 'w') as f:
    for (prompt, reference, _), answer, score in zip(examples, answers, rouge_l):
      f.write(json.dumps({'messages': prompt, 'reference': reference, 'answer': answer,
                          'rouge_l': 100 * score}, ensure_ascii=False) + '\n')
  result['path'], result['samples_path'] = path, samples_path
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.keep_freed_host_memory()
  cli.skip_absent_tpu()
  cli.quiet_logs(logging.ERROR)
  with cli.one_line_errors():
    if not FLAGS.workdir:
      raise ConfigError('--workdir is required')
    if FLAGS.seq_len < 0 or FLAGS.batch_size < 0:
      raise ConfigError('--seq_len and --batch_size must be positive (0: from the config)')
    if FLAGS.chat_files:
      given = [f'--{name}' for name in ('split', 'text_files', 'seq_len', 'tfds_data_dir')
               if FLAGS[name].present]
      if given:
        raise ConfigError(f'--chat_files cannot be combined with {", ".join(given)}')
      result = evaluate_chat(FLAGS.workdir, FLAGS.chat_files, FLAGS.max_new_tokens,
                             FLAGS.batch_size, FLAGS.step, FLAGS.progress_bar, FLAGS.mesh)
      print(f"chat {result['chat_files']} (step {result['step']}): BLEU {result['bleu']:.2f}, "
            f"ROUGE-L {result['rouge_l']:.2f}, exact match {result['exact_match']:.1%}, "
            f"assistant loss {result['assistant_loss']:.4f} over {result['conversations']:,} "
            f"conversations -> {result['path']}")
      return
    result = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.text_files, FLAGS.seq_len,
                      FLAGS.batch_size, FLAGS.step, FLAGS.tfds_data_dir, FLAGS.progress_bar,
                      FLAGS.mesh)
  print(f"{result['dataset']} {result['split']} (step {result['step']}): loss "
        f"{result['loss']:.4f}, perplexity {result['perplexity']:.2f}, bits/byte "
        f"{result['bits_per_byte']:.4f} over {result['tokens']:,} tokens, {result['bytes']:,} "
        f"bytes -> {result['path']}")


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
