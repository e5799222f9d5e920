r"""Training-step speed: gpt_jax's jitted train step against a plain PyTorch GPT, in one run.

  python experiments/benchmarks/bench_train.py                  # baby, 10M, GPT-2 124M shapes
  python experiments/benchmarks/bench_train.py --quick          # baby only, few steps (< 1 min)
  python experiments/benchmarks/bench_train.py --shapes=baby,10m --json=/tmp/bench.json
  python experiments/benchmarks/bench_train.py --shapes=124m --torch_process=own  # torch as a plain script runs

For each shape and precision, both sides train on the same random token batches:
- ours: the real step (`steps.sharded_state` + `steps.make_train_step` + `optim.make_optimizer`
  from the base config: AdamW, warmup-cosine, global-norm clipping, non-finite guard), jitted
  with shardings and donation on a one-device mesh, as `gpt_jax.train` runs it. bf16 rows set
  `model.compute_dtype='bfloat16'` (float32 parameters, optimizer and residual stream).
- reference: the model of ../shared/peers/torch_gpt.py (same GPT-2 layout, tied embeddings),
  torch AdamW with weight decay on matrices only, grad-norm clipping. It is timed at
  torch.set_num_threads(2) and (1): on two cores shared with other jobs, 2 threads can be several
  times slower than 1 (each OpenMP barrier waits for a descheduled thread). bf16 rows run its forward under torch.autocast('cpu', torch.bfloat16).
The process keeps freed host memory as `gpt_jax.train` does on CPU (gpt_jax/backends/cpu/host_memory.py;
--host_memory=default: glibc's defaults). The reference runs in this process, with the same
malloc settings, or with --torch_process=own in a fresh process with glibc's defaults.
Timed blocks alternate (ours, torch 2T, torch 1T, ours, ...) so that load from other processes falls
on both; the step time is the median over blocks of the block's mean step time. Compile time is
ours' `lower().compile()`; "first step" is each side's first call, unwarmed. Model FLOPs are
`flops.train_flops_per_token` (6N plus attention); MFU is against `flops.measure_matmul_peak`
for the row's dtype, measured in this process just before the row.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..'))
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'shared', 'peers'))
from gpt_jax import config as config_lib, flops, lora, optim, sharding, steps  # noqa: E402
from gpt_jax.backends.cpu import host_memory  # noqa: E402
from gpt_jax.model import LoraConfig, ModelConfig, Transformer, count_params  # noqa: E402
import torch_gpt  # noqa: E402

# name: (layers, heads, emb, context, batch, vocab, steps per timed block, timed blocks per side)
SHAPES = {
    'baby': (4, 4, 128, 64, 12, 65, 20, 5),
    '10m': (6, 6, 384, 256, 8, 1024, 2, 4),
    '124m': (12, 12, 768, 256, 4, 50304, 1, 2),
}


# ---------------------------------------------------------------------------------- gpt_jax side

class Ours:
  def __init__(self, shape, dtype: str, num_batches: int):
    layers, heads, emb, ctx, batch, vocab, _, _ = shape
    config = config_lib.base_config()
    config.model.update({'num_layers': layers, 'num_heads': heads, 'emb_dim': emb,
                         'mlp_dim': 4 * emb, 'max_len': ctx, 'vocab_size': vocab,
                         'dropout': 0.0, 'compute_dtype': dtype})
    config.mesh.data = 1
    self.model_cfg = ModelConfig.from_config(config.model)
    model = Transformer(self.model_cfg)
    num_steps = 1000
    schedule = optim.learning_rate_schedule(config.optim, num_steps)
    tx = optim.make_optimizer(config.optim, num_steps)
    self.mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    self.rules = sharding.logical_rules(config.mesh)
    every_param = lora.Trainable(LoraConfig())
    init, (abstract, _) = steps.sharded_state(model, tx, ctx, self.mesh, self.rules, every_param)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    rng = np.random.default_rng(0)
    self.batches = []
    for _ in range(num_batches):
      tokens = rng.integers(0, vocab, size=(batch, ctx + 1), dtype=np.int32)
      self.batches.append({k: jax.make_array_from_process_local_data(batch_sharding, v)
                           for k, v in (('inputs', tokens[:, :-1]), ('targets', tokens[:, 1:]))})
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.state, _ = jax.jit(init, out_shardings=(shardings, {}))(jax.random.key(0))
      jitted = jax.jit(steps.make_train_step(model, schedule, 1, 0, every_param),
                       in_shardings=(shardings, batch_sharding, {}),
                       out_shardings=(shardings, None), donate_argnums=0)
      self.step_jit = jitted  # for tracing: experiments/benchmarks/bench_product_bound.py
      start = time.perf_counter()
      self.step_fn = jitted.lower(self.state, self.batches[0], {}).compile()
      self.compile_s = time.perf_counter() - start
    self.num_params = count_params(self.state.params)
    self.i = 0

  def steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step_fn(self.state, self.batches[self.i % len(self.batches)], {})
      self.i += 1
    jax.block_until_ready((self.state, metrics))
    self.last_loss = float(metrics['train_loss'])
    return time.perf_counter() - start


def alternate(sides: dict, steps: int, blocks: int) -> dict:
  """Each side's ms/step in `blocks` timed blocks of `steps` steps, the sides taking turns, after
  one untimed step each. A side is anything whose `steps(n)` returns the seconds n steps took:
  variants of our step compiled in one process, or bench_product_bound.py's sides."""
  for side in sides.values():
    side.steps(1)
  times = {name: [] for name in sides}
  for _ in range(blocks):
    for name, side in sides.items():
      times[name].append(side.steps(steps) / steps * 1000)
  return times


def compare_in_step(description: str, variants: dict, ours: str) -> None:
  """The command line of a script comparing forms of our step: for each shape and dtype asked
  for, one step per variant, compiled while variants[name]() (a context manager, e.g.
  `unittest.mock.patch.object` of a model function) is active, timed by `alternate`; prints a
  Markdown row per shape and dtype with the speedup of `ours` over each other variant."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--shapes', default='baby,10m,124m')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--blocks', type=int, default=4, help='timed blocks per variant')
  parser.add_argument('--json', default='', help='write every row and block time here')
  args = parser.parse_args()
  host_memory.keep_freed_memory()  # as gpt_jax.train does on CPU; before JAX starts
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs')
  others = [name for name in variants if name != ours]
  print(f'| shape | dtype | {ours} ms/step | '
        + ' | '.join(f'{name} ms/step' for name in others) + ' | '
        + ' | '.join(f'speedup over {name}' for name in others) + ' |')
  print('|---' * (3 + 2 * len(others)) + '|')
  rows = []
  for name in args.shapes.split(','):
    for dtype in args.dtypes.split(','):
      sides = {}
      for variant, active in variants.items():
        with active():
          sides[variant] = Ours(SHAPES[name], dtype, 4)
      times = alternate(sides, SHAPES[name][6], args.blocks)
      ms = {variant: statistics.median(t) for variant, t in times.items()}
      rows.append({'shape': name, 'dtype': dtype, 'ms_per_step': ms, 'blocks': times,
                   'last_loss': {variant: side.last_loss for variant, side in sides.items()}})
      print(f'| {name} | {dtype} | {ms[ours]:.1f} | '
            + ' | '.join(f'{ms[other]:.1f}' for other in others) + ' | '
            + ' | '.join(f'{ms[other] / ms[ours]:.2f}x' for other in others) + ' |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                 'argv': sys.argv[1:], 'jax': jax.__version__, 'load_average': os.getloadavg(),
                 'rows': rows}, f, indent=1)


# ---------------------------------------------------------------------------------- torch side

class Reference:
  def __init__(self, shape, dtype: str, num_batches: int):
    layers, heads, emb, ctx, batch, vocab, _, _ = shape
    torch.manual_seed(0)
    self.model = torch_gpt.GPT(vocab, ctx, layers, heads, emb)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    params = list(self.model.parameters())
    base = config_lib.base_config().optim
    self.opt = torch.optim.AdamW(
        [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': base.weight_decay},
         {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
        lr=base.lr, betas=(base.b1, base.b2), eps=base.eps)
    self.autocast = dtype == 'bfloat16'
    rng = np.random.default_rng(0)
    self.batches = []
    for _ in range(num_batches):
      tokens = torch.from_numpy(rng.integers(0, vocab, size=(batch, ctx + 1)))
      self.batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    self.i = 0

  def steps(self, n: int, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(n):
      x, y = self.batches[self.i % len(self.batches)]
      self.i += 1
      with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
        loss = self.model(x, y)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
    self.last_loss = float(loss.detach())
    return time.perf_counter() - start

  def close(self):
    """Nothing to release: the reference runs in this process."""


def _reference_worker(conn, shape, dtype: str, num_batches: int):
  ref = Reference(shape, dtype, num_batches)
  conn.send(ref.num_params)
  while (request := conn.recv()) is not None:
    n, threads = request
    seconds = ref.steps(n, threads)
    conn.send((seconds, ref.last_loss))


class ReferenceInOwnProcess:
  """The reference in a fresh process (glibc's malloc defaults, as a plain PyTorch script runs),
  timed there; it waits while gpt_jax's blocks run, so the sides still alternate."""

  def __init__(self, shape, dtype: str, num_batches: int):
    context = multiprocessing.get_context('spawn')
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_reference_worker, daemon=True,
                                    args=(child, shape, dtype, num_batches))
    self._process.start()
    self.num_params = self._conn.recv()

  def steps(self, n: int, threads: int = 2) -> float:
    self._conn.send((n, threads))
    seconds, self.last_loss = self._conn.recv()
    return seconds

  def close(self):
    self._conn.send(None)
    self._process.join()


# ---------------------------------------------------------------------------------- benchmark

def bench(name: str, dtype: str, quick: bool, torch_threads: list[int],
          torch_process: str = 'same', blocks: int = 0) -> dict:
  shape = SHAPES[name]
  layers, heads, emb, ctx, batch, vocab, block_steps, shape_blocks = shape
  blocks = blocks or shape_blocks
  if quick:
    block_steps, blocks = 5, 3
  peak = flops.measure_matmul_peak(dtype)
  ours = Ours(shape, dtype, num_batches=4)
  ref = (ReferenceInOwnProcess if torch_process == 'own' else Reference)(shape, dtype, 4)
  first_ours = ours.steps(1)
  first_ref = ref.steps(1, torch_threads[0])
  ours.steps(1)  # warm-up
  for t in torch_threads:
    ref.steps(1, t)
  times_ours, times_ref = [], {t: [] for t in torch_threads}
  for _ in range(blocks):
    times_ours.append(ours.steps(block_steps) / block_steps)
    for t in torch_threads:
      times_ref[t].append(ref.steps(block_steps, t) / block_steps)
  ref.close()
  step_ours = statistics.median(times_ours)
  step_ref = {t: statistics.median(v) for t, v in times_ref.items()}
  best_threads = min(step_ref, key=step_ref.get)
  tokens = batch * ctx
  flops_per_step = flops.train_flops_per_token(ours.model_cfg, ctx) * tokens
  row = {
      'shape': name, 'dtype': dtype, 'layers': layers, 'heads': heads, 'emb': emb,
      'context': ctx, 'batch': batch, 'vocab': vocab,
      'params_ours': ours.num_params, 'params_torch': ref.num_params,
      'timed_steps_per_side': block_steps * blocks,
      'step_s_ours': step_ours, 'block_step_s_ours': times_ours,
      'tokens_per_s_ours': tokens / step_ours,
      'compile_s_ours': ours.compile_s, 'first_step_s_ours': first_ours,
      'first_step_s_torch': first_ref,
      'model_flops_per_step': flops_per_step, 'peak_flops': peak,
      'mfu_ours': flops_per_step / step_ours / peak,
      'loss_ours': ours.last_loss, 'loss_torch': ref.last_loss,
      'torch_process': torch_process,
      'torch_best_threads': best_threads,
      'speedup_vs_best_torch': step_ref[best_threads] / step_ours,
      'mfu_best_torch': flops_per_step / step_ref[best_threads] / peak,
  }
  for t in torch_threads:
    row[f'step_s_torch_{t}t'] = step_ref[t]
    row[f'block_step_s_torch_{t}t'] = times_ref[t]
    row[f'tokens_per_s_torch_{t}t'] = tokens / step_ref[t]
    row[f'speedup_vs_torch_{t}t'] = step_ref[t] / step_ours
  return row


def table(rows, torch_threads) -> str:
  head = ['shape', 'dtype', 'params', 'gpt_jax ms/step']
  head += [f'torch {t}T ms/step' for t in torch_threads]
  head += ['gpt_jax tok/s'] + [f'torch {t}T tok/s' for t in torch_threads]
  head += [f'ratio vs {t}T' for t in torch_threads]
  head += ['compile s', 'peak GFLOP/s', 'MFU gpt_jax', 'MFU best torch']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['shape'], r['dtype'], f"{r['params_ours'] / 1e6:.2f}M",
             f"{1e3 * r['step_s_ours']:.1f}"]
    cells += [f"{1e3 * r[f'step_s_torch_{t}t']:.1f}" for t in torch_threads]
    cells += [f"{r['tokens_per_s_ours']:,.0f}"]
    cells += [f"{r[f'tokens_per_s_torch_{t}t']:,.0f}" for t in torch_threads]
    cells += [f"{r[f'speedup_vs_torch_{t}t']:.2f}x" for t in torch_threads]
    cells += [f"{r['compile_s_ours']:.1f}", f"{r['peak_flops'] / 1e9:.0f}",
              f"{100 * r['mfu_ours']:.0f}%", f"{100 * r['mfu_best_torch']:.0f}%"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='baby shape only, 3 blocks of 5 steps')
  parser.add_argument('--shapes', default='baby,10m,124m', help=f'comma list of {list(SHAPES)}')
  parser.add_argument('--dtypes', default='float32,bfloat16', help='float32 and/or bfloat16')
  parser.add_argument('--torch_threads', default='2,1',
                      help='torch.set_num_threads values to time the reference at (alternating)')
  parser.add_argument('--host_memory', default='keep', choices=['keep', 'default'],
                      help='keep: freed host memory stays in the process, as gpt_jax.train does '
                      'on CPU (gpt_jax/backends/cpu/host_memory.py); default: glibc\'s defaults')
  parser.add_argument('--torch_process', default='same', choices=['same', 'own'],
                      help='same: the reference runs in this process (and gets --host_memory '
                      'too); own: in a fresh process with glibc\'s defaults, as a plain '
                      'PyTorch script runs')
  parser.add_argument('--blocks', type=int, default=0,
                      help='timed blocks per side (default: per shape, 2 at 124m)')
  parser.add_argument('--json', default='', help='write the rows here as JSON')
  args = parser.parse_args()
  kept = args.host_memory == 'keep' and host_memory.keep_freed_memory()
  print(f'freed host memory kept: {kept}; torch runs in {args.torch_process} process', flush=True)
  torch_threads = [int(t) for t in args.torch_threads.split(',')]
  shapes = ['baby'] if args.quick else args.shapes.split(',')
  dtypes = ['float32'] if args.quick else args.dtypes.split(',')
  started = time.time()
  rows = []
  for name in shapes:
    for dtype in dtypes:
      row = bench(name, dtype, args.quick, torch_threads, args.torch_process, args.blocks)
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if not k.startswith('block_')}), flush=True)
  print(table(rows, torch_threads))
  if args.json:
    meta = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'argv': sys.argv[1:], 'torch_threads': torch_threads, 'host_memory_kept': kept,
            'torch_process': args.torch_process, 'load_average': os.getloadavg(), 'jax': jax.__version__,
            'torch': torch.__version__, 'wall_s': time.time() - started}
    with open(args.json, 'w') as f:
      json.dump({'meta': meta, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
