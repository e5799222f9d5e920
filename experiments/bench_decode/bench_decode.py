r"""Greedy decoding speed, gpt_jax against Hugging Face transformers, on the same GPT-2 weights.

  python experiments/bench_decode/bench_decode.py            # full run (a few minutes on 2 cores)
  python experiments/bench_decode/bench_decode.py --quick    # fewer tokens and repeats
  python experiments/bench_decode/bench_decode.py --json=experiments/bench_decode/results.json

A randomly initialised GPT-2 124M (`GPT2LMHeadModel(GPT2Config())`, float32) is converted in
memory with gpt_jax.convert; both sides decode 128 new tokens greedily after a 16-token random
prompt, at batch 1 and 8, timed end to end (prefill included) as the best of several runs after
a warm-up (which compiles ours); the sides take turns, one run each per round. transformers
runs `generate(do_sample=False, use_cache=True)`.

Batch 1 is memory-bound: every new token reads every parameter once. The bound is parameter
bytes per token over a measured copy bandwidth (2 x bytes / time of copying a 1 GiB float32
array, the best of numpy and a jitted XLA copy); the table gives the fraction of it reached.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from gpt_jax import decode  # noqa: E402
from gpt_jax.convert import gpt2  # noqa: E402
from gpt_jax.model import ModelConfig  # noqa: E402


def copy_bandwidth_meter(num_bytes: int):
  """A function returning bytes/s moved (read + write) by one copy of a float32 array of
  num_bytes: the better of numpy and XLA. The arrays are allocated (and paged in) once."""
  src = np.random.default_rng(0).random(num_bytes // 4, dtype=np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  x = jnp.asarray(src)
  copy = jax.jit(lambda x: x * 1.0000001)  # reads and writes every element; not elided
  copy(x).block_until_ready()

  def measure() -> float:
    seconds = min(_timed(lambda: np.copyto(dst, src)),
                  _timed(lambda: copy(x).block_until_ready()))
    return 2 * num_bytes / seconds
  return measure


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='32 new tokens, 1 timed run each')
  parser.add_argument('--batch_sizes', default='1,8')
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--prompt_len', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--bf16', action='store_true', help='also time ours with bfloat16 params')
  parser.add_argument('--trained_layout', action='store_true',
                      help='also time ours with the kernels as trained (not output-major)')
  parser.add_argument('--json', default='', help='write the rows and every timing here as JSON')
  args = parser.parse_args()
  started = time.time()
  new_tokens = 32 if args.quick else args.new_tokens
  repeats = 1 if args.quick else args.repeats

  torch.manual_seed(0)
  hf_config = transformers.GPT2Config()
  hf = transformers.GPT2LMHeadModel(hf_config).eval()
  model = gpt2.model_fields_from_hf(hf_config.to_dict())
  tensors = {k.removeprefix('transformer.'): v.detach().numpy()
             for k, v in hf.state_dict().items()}
  params = jax.tree.map(jnp.asarray, gpt2.hf_to_params(tensors, model))
  cfg = ModelConfig(**model)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  param_bytes = 4 * num_params

  measure_bandwidth = copy_bandwidth_meter(1 << 30)
  bandwidth = max(measure_bandwidth() for _ in range(max(repeats, 2)))
  bound = bandwidth / param_bytes
  print(f'{datetime.date.today()}  jax {jax.__version__}, torch {torch.__version__}, transformers '
        f'{transformers.__version__}, {os.cpu_count()} CPUs, torch threads '
        f'{torch.get_num_threads()}')
  print(f'GPT-2 124M shape: {num_params / 1e6:.1f}M params, {param_bytes / 1e6:.0f} MB float32; '
        f'copy bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 bound {bound:.1f} tokens/s')
  print(f'{new_tokens} new tokens after {args.prompt_len} prompt tokens, greedy, best of '
        f'{repeats}\n')

  variants = [('float32', decode.Generator(cfg, params))]
  if args.trained_layout:
    variants.append(('float32, trained layout', decode.Generator(cfg, params, output_major=False)))
  if args.bf16:
    cfg16 = ModelConfig(**{**model, 'param_dtype': 'bfloat16', 'compute_dtype': 'bfloat16'})
    variants.append(('bfloat16', decode.Generator(
        cfg16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))))

  rows = []
  all_times, first_calls = {}, {}
  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.batch_sizes.split(',')]:
    prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len))
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run_hf():
      with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=0)[:, args.prompt_len:].numpy()

    runs = {'transformers': run_hf}
    for name, generator in variants:
      runs[name] = lambda g=generator: g.generate(prompts.tolist(), new_tokens, temperature=0)
    outputs, first_call = {}, {}
    for name, run in runs.items():  # warm-up; compiles ours
      start = time.perf_counter()
      outputs[name] = run()
      first_call[name] = time.perf_counter() - start
    print(f'  batch {batch}: first call (ours compiles) ' +
          ', '.join(f'{name} {t:.2f} s' for name, t in first_call.items()), flush=True)
    first_calls[batch] = first_call
    # Alternating, so that a slow spell of this shared machine hits every side alike.
    times = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(repeats):
      # Each round starts with another side, so none always follows transformers (whose
      # OpenMP threads may still be spinning when the next side starts).
      shift = round_index % len(names)
      for name in names[shift:] + names[:shift]:
        times[name].append(_timed(runs[name]))
      # The bound takes its turn too: the best bandwidth seen goes with the best times.
      bandwidth = max(bandwidth, measure_bandwidth())
    all_times[batch] = times
    best = {name: min(t) for name, t in times.items()}
    t_hf = best['transformers']
    print(f'  batch {batch}: transformers {batch * new_tokens / t_hf:.1f} tokens/s', flush=True)
    for name, _ in variants:
      same = (np.mean(np.asarray(outputs[name]) == outputs['transformers'])
              if name.startswith('float32') else float('nan'))
      rows.append((batch, name, batch * new_tokens / best[name], batch * new_tokens / t_hf, same))
      print(f'  batch {batch}: gpt_jax {name} {rows[-1][2]:.1f} tokens/s', flush=True)

  bound = bandwidth / param_bytes
  print(f'\nbest copy bandwidth over all rounds {bandwidth / 1e9:.1f} GB/s -> batch-1 bound '
        f'{bound:.1f} tokens/s\n')
  print('| batch | params | gpt_jax tokens/s | transformers tokens/s | ratio | bandwidth bound '
        '| fraction of bound | same greedy tokens |')
  print('|---|---|---|---|---|---|---|---|')
  for batch, name, ours, theirs, same in rows:
    b1 = batch == 1
    print(f'| {batch} | {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | '
          f'{f"{bound:.1f}" if b1 else "-"} | {f"{ours / bound:.0%}" if b1 else "-"} | '
          f'{"-" if same != same else f"{same:.0%}"} |')
  if args.json:
    meta = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'argv': sys.argv[1:], 'new_tokens': new_tokens, 'prompt_len': args.prompt_len,
            'copy_bandwidth_GBps': bandwidth / 1e9, 'load_average': os.getloadavg(),
            'jax': jax.__version__, 'torch': torch.__version__,
            'transformers': transformers.__version__, 'wall_s': time.time() - started}
    keys = ('batch', 'params', 'gpt_jax_tokens_per_s', 'transformers_tokens_per_s',
            'same_greedy_tokens')
    with open(args.json, 'w') as f:
      json.dump({'meta': meta,
                 'rows': [dict(zip(keys, (b, n, o, t, None if s != s else s)),
                               ratio=o / t, fraction_of_bound=o / bound if b == 1 else None)
                          for b, n, o, t, s in rows],
                 'seconds_per_run': {str(b): t for b, t in all_times.items()},
                 'first_call_seconds': {str(b): t for b, t in first_calls.items()}}, f, indent=1)


if __name__ == '__main__':
  main()
