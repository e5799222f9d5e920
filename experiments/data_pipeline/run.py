r"""The input pipeline alone: the cached stream against streaming with 1 and 2 tokenizer workers.

  python experiments/data_pipeline/run.py --data_dir=/tmp/zipf_corpus [--sizes_mb=2048,512] \
      [--seconds=40] [--cached_mb=512,2048]

For each corpus size (zipf_corpus.py, built first if absent), each mode runs in a fresh process
with configs/gpt2_124m.py's data settings (32,000-piece sentencepiece, batches of 128 x 1024
tokens, as one v5e-8 host reads them) and reports:
- time from creating the iterator to the first batch (the cached mode tokenizes the whole
  split first, in one process);
- steady input throughput: tokens/s of batches taken as fast as the pipeline gives them, over
  `--seconds` after the first batch;
- peak resident memory of the process and its worker processes together (sampled every 0.1 s).

Against them, what the train step consumes per host: analytic FLOPs per token
(gpt_jax/flops.py) at 50% MFU of the host's chips, for gpt2_124m on a v5e-8 (8 chips per host)
and llama_1b on a v5p-8 (4 chips per host).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def pipeline_config(args, size_mb: int, streaming: bool, workers: int, cache_dir: str):
  config = load_config('gpt2_124m')
  data = config.data
  data.tfds_name, data.tfds_data_dir = f'zipf_corpus/mb{size_mb}', args.data_dir
  data.streaming = 'true' if streaming else 'false'
  data.worker_count, data.cache_dir = workers, cache_dir
  data.spm_train_chars = args.spm_train_chars
  return config


class PeakMemory:
  """The largest sum of resident memory of this process and its children, sampled."""

  def __init__(self, interval=0.1):
    import psutil  # pylint: disable=import-outside-toplevel
    self.peak, self._stop = 0, threading.Event()
    process = psutil.Process()

    def sample():
      while not self._stop.is_set():
        total = 0
        for p in [process] + process.children(recursive=True):
          try:
            total += p.memory_info().rss
          except psutil.Error:
            pass
        self.peak = max(self.peak, total)
        time.sleep(interval)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


def measure(args) -> dict:
  """One mode in this process: {'first_batch_s', 'tokens_per_s', 'peak_rss_gb', ...}."""
  import zipf_corpus  # pylint: disable=import-outside-toplevel,unused-import  (registers it)
  from gpt_jax import data, streaming, tokenizer  # pylint: disable=import-outside-toplevel
  cache_dir = tempfile.mkdtemp(prefix='token_cache_', dir=args.data_dir)
  config = pipeline_config(args, args.size_mb, args.mode == 'stream', args.workers, cache_dir)
  tok = tokenizer.load(os.path.join(args.data_dir, 'workdir', 'tokenizer'))
  memory = PeakMemory()
  start = time.perf_counter()
  if args.mode == 'stream':
    iterator = streaming.make_train_iterator(config, tok, 0, 1)
  else:
    iterator = data.make_train_iterator(config, tok, config.data.cache_dir, 0, 1)
  batch = next(iterator)
  first = time.perf_counter() - start
  tokens_per_batch = batch['inputs'].size
  batches, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < args.seconds:
    next(iterator)
    batches += 1
  elapsed = time.perf_counter() - t0
  iterator.close()
  peak = memory.stop()
  return {'mode': args.mode, 'workers': args.workers if args.mode == 'stream' else 0,
          'size_mb': args.size_mb, 'first_batch_s': round(first, 2),
          'tokens_per_s': round(batches * tokens_per_batch / elapsed),
          'batches': batches, 'peak_rss_gb': round(peak / 1e9, 3),
          # The machine's other work competes for the same cores: its load, over 1 minute.
          'load_average': round(os.getloadavg()[0], 1), 'cpus': os.cpu_count()}


def measure_tokenizing(args) -> dict:
  """One process's sentencepiece encoding of this text, what each worker does."""
  import zipf_corpus  # pylint: disable=import-outside-toplevel
  from gpt_jax import tokenizer  # pylint: disable=import-outside-toplevel
  tok = tokenizer.load(os.path.join(args.data_dir, 'workdir', 'tokenizer'))
  texts = list(zipf_corpus.documents(3, 16 * 2**20))
  start = time.perf_counter()
  count = sum(len(tok.encode(text)) for text in texts)
  elapsed = time.perf_counter() - start
  return {'mode': 'tokenize only', 'workers': 0, 'size_mb': 16, 'first_batch_s': 0.0,
          'tokens_per_s': round(count / elapsed), 'batches': 0, 'peak_rss_gb': 0.0,
          'tokens_per_byte': round(count / sum(map(len, texts)), 3),
          'load_average': round(os.getloadavg()[0], 1), 'cpus': os.cpu_count()}


def measure_packing(args) -> dict:
  """The training process's share of streaming alone: packing, window shuffle and batching of
  documents already tokenized (in memory), i.e. the ceiling however many workers tokenize."""
  import itertools  # pylint: disable=import-outside-toplevel
  import grain  # pylint: disable=import-outside-toplevel
  import zipf_corpus  # pylint: disable=import-outside-toplevel
  from gpt_jax import streaming, tokenizer  # pylint: disable=import-outside-toplevel
  config = pipeline_config(args, args.size_mb, True, 0, '')
  tok = tokenizer.load(os.path.join(args.data_dir, 'workdir', 'tokenizer'))
  encode = streaming._Tokenize(tok, 'text')  # pylint: disable=protected-access
  documents = [encode.map({'text': t}) for t in zipf_corpus.documents(2, 64 * 2**20)]
  source = grain.MapDataset.source(documents).repeat().to_iter_dataset()
  rows = grain.experimental.WindowShuffleIterDataset(
      streaming._Windows(source, config.data.seq_len + 1),  # pylint: disable=protected-access
      window_size=config.data.shuffle_buffer, seed=0)
  batches = iter(rows.map(streaming._to_row(False)).batch(  # pylint: disable=protected-access
      config.data.batch_size))
  next(batches)
  count, start = 0, time.perf_counter()
  for batch in itertools.takewhile(lambda _: time.perf_counter() - start < args.seconds,
                                   batches):
    count += batch['inputs'].size
  return {'mode': 'pack only', 'workers': 0, 'size_mb': 64, 'first_batch_s': 0.0,
          'tokens_per_s': round(count / (time.perf_counter() - start)), 'batches': 0,
          'peak_rss_gb': 0.0, 'load_average': round(os.getloadavg()[0], 1),
          'cpus': os.cpu_count()}


def required_tokens_per_s() -> dict:
  from gpt_jax import flops  # pylint: disable=import-outside-toplevel
  from gpt_jax.tpu import topology as tpu
  from gpt_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  needs = {}
  for name, chip, chips_per_host in (('gpt2_124m', 'v5e', 8), ('llama_1b', 'v5p', 4)):
    config = load_config(name)
    config.model.vocab_size = config.model.vocab_size or config.data.vocab_size
    per_token = flops.train_flops_per_token(ModelConfig.from_config(config.model),
                                            config.data.seq_len)
    peak = tpu.CHIPS[chip].peak_bf16_flops * chips_per_host
    needs[f'{name} on {chip} (per host, 50% MFU)'] = round(0.5 * peak / per_token)
  return needs


def prepare(args) -> None:
  """Builds the corpora (timed) and trains the tokenizer once, on the largest."""
  import zipf_corpus  # pylint: disable=import-outside-toplevel,unused-import
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  from gpt_jax import data  # pylint: disable=import-outside-toplevel
  # TFDS's writer holds up to 1 GB of a split in memory and spills the rest to disk through
  # TensorFlow, which gpt_jax does not install: hold it all (the 2 GiB corpus takes ~3 GB).
  shuffle.MAX_MEM_BUFFER_SIZE = max(shuffle.MAX_MEM_BUFFER_SIZE, 2 * max(args.sizes) << 20)
  for size_mb in args.sizes:
    builder = tfds.builder(f'zipf_corpus/mb{size_mb}', data_dir=args.data_dir)
    if not builder.is_prepared():
      start = time.perf_counter()
      builder.download_and_prepare(file_format='array_record')
      print(f'built zipf_corpus/mb{size_mb} in {time.perf_counter() - start:.0f} s', flush=True)
  workdir = os.path.join(args.data_dir, 'workdir')
  if not os.path.isdir(os.path.join(workdir, 'tokenizer')):
    start = time.perf_counter()
    data.prepare_tokenizer(pipeline_config(args, max(args.sizes), False, 0, ''), workdir)
    print(f'trained the tokenizer in {time.perf_counter() - start:.0f} s', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', required=True, help='TFDS data dir for the corpora')
  parser.add_argument('--sizes_mb', default='2048,512')
  parser.add_argument('--cached_mb', default='512,2048',
                      help='corpus sizes for the cached mode (it tokenizes all of it first)')
  parser.add_argument('--seconds', type=float, default=40)
  parser.add_argument('--results', help='also append each measurement to this JSONL file')
  parser.add_argument('--spm_train_chars', type=int, default=5_000_000)
  # Internal: measure one mode, in this process.
  parser.add_argument('--mode', choices=['cached', 'stream', 'pack', 'tokenize'])
  parser.add_argument('--workers', type=int, default=0)
  parser.add_argument('--size_mb', type=int)
  args = parser.parse_args()
  args.sizes = [int(s) for s in args.sizes_mb.split(',')]
  if args.mode:
    measure_mode = {'pack': measure_packing, 'tokenize': measure_tokenizing}.get(args.mode,
                                                                                 measure)
    print(json.dumps(measure_mode(args)), flush=True)
    return
  prepare(args)
  # Streaming first: the cached mode's tokenization of the large corpus takes longest.
  cases = [('tokenize', 0, min(args.sizes)), ('pack', 0, min(args.sizes))] + [
      ('stream', workers, size) for size in args.sizes for workers in (1, 2)] + [
      ('cached', 0, int(size)) for size in args.cached_mb.split(',') if size]
  rows = []
  for mode, workers, size in cases:
    out = subprocess.run(
        [sys.executable, __file__, f'--data_dir={args.data_dir}', f'--mode={mode}',
         f'--workers={workers}', f'--size_mb={size}', f'--seconds={args.seconds}',
         f'--sizes_mb={args.sizes_mb}', f'--spm_train_chars={args.spm_train_chars}'],
        check=True, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
    if args.results:
      with open(args.results, 'a', encoding='utf-8') as f:
        f.write(json.dumps(rows[-1]) + '\n')
  needs = required_tokens_per_s()
  print('\n| mode | workers | corpus | first batch | tokens/s | peak RSS | load |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['mode']} | {r['workers']} | {r['size_mb']} MiB | {r['first_batch_s']:.1f} s | "
          f"{r['tokens_per_s']:,} | {r['peak_rss_gb']:.2f} GB | {r['load_average']} |")
  print()
  for name, need in needs.items():
    best = max(r['tokens_per_s'] for r in rows if r['mode'] == 'stream')
    print(f'{name}: {need:,} tokens/s needed; best streaming here {best:,} '
          f'({best / need:.2f}x)')


if __name__ == '__main__':
  main()
