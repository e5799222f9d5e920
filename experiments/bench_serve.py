r"""Serving and int8 benchmark: gpt_jax.serve throughput and latency under 1, 8 and 32 concurrent
clients, the batching gain over one-at-a-time serving, and int8 weights' memory, perplexity
and batch-1 decode speed. Results: experiments/bench_serve/README.md and results.json.

  python experiments/bench_serve.py --workdir=runs/shakespeare_char_repro/gpt_jax
  python experiments/bench_serve.py --workdir=... --quick     # fewer requests, 1 timed run

Serving: the real binary in a subprocess (--slots=32), driven by the openai client's async API
over loopback; each client sends its requests one after another (streaming completions of
--max_tokens tokens, temperature 0.8). Throughput counts generated tokens over the wall time of
the whole level; latency is per request, time to first token from the first streamed chunk.
The batching gain: the same 32 clients against the same binary with --slots=1 (every request
decoded alone), in the same run.

int8: parameter bytes, validation loss and perplexity of the workdir's model (float32 against
int8, the same windows), and greedy decode speed at batch 1 of a GPT-2 124M-shaped model
(random weights; memory-bound: every token reads every parameter), best of --repeats.
"""

import argparse
import asyncio
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpt_jax import checkpoint, data, eval as eval_lib  # noqa: E402
from gpt_jax.inference import quantize
from gpt_jax import tokenizer as tokenizer_lib  # noqa: E402
from gpt_jax.model import ModelConfig, Transformer  # noqa: E402

PROMPTS = ['ROMEO:\n', 'First Citizen:\n', 'The ', 'KING HENRY:\nWhat ', 'O, ', 'JULIET:\nI ',
           'Come, ', 'And ']
GPT2_124M = ModelConfig(vocab_size=50257, max_len=1024, num_layers=12, num_heads=12, emb_dim=768,
                        mlp_dim=3072)


# ------------------------------------------------------------------ serving


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(workdir: str, slots: int, quantize_mode: str = 'none'):
  import httpx
  port = _free_port()
  proc = subprocess.Popen([sys.executable, '-m', 'gpt_jax.serve', f'--workdir={workdir}',
                           f'--port={port}', f'--slots={slots}', f'--quantize={quantize_mode}',
                           '--model_name=bench'], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 300
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f'server exited: {proc.stderr.read()[-2000:]}')
    try:
      if httpx.get(f'{url}/health', timeout=1).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.kill()
      raise RuntimeError('server did not start in 300 s')
    time.sleep(0.5)


async def _level(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
  import openai
  client = openai.AsyncOpenAI(base_url=f'{url}/v1', api_key='x', max_retries=0, timeout=600)
  latencies, first_token, tokens = [], [], [0]

  async def one_client(c):
    for r in range(requests_per_client):
      start = time.perf_counter()
      first = None
      stream = await client.completions.create(
          model='bench', prompt=PROMPTS[(c + r) % len(PROMPTS)], max_tokens=max_tokens,
          temperature=0.8, seed=c * 1000 + r, stream=True, stream_options={'include_usage': True})
      async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
          first = time.perf_counter() - start
        if chunk.usage:
          tokens[0] += chunk.usage.completion_tokens
      latencies.append(time.perf_counter() - start)
      first_token.append(first if first is not None else latencies[-1])

  start = time.perf_counter()
  await asyncio.gather(*[one_client(c) for c in range(clients)])
  wall = time.perf_counter() - start
  await client.close()
  pct = lambda xs, q: float(np.percentile(xs, q) * 1000)  # noqa: E731
  return {'clients': clients, 'requests': len(latencies), 'tokens': tokens[0],
          'seconds': round(wall, 3), 'tokens_per_s': round(tokens[0] / wall, 1),
          'latency_ms': {f'p{q}': round(pct(latencies, q), 1) for q in (50, 90, 99)},
          'first_token_ms': {f'p{q}': round(pct(first_token, q), 1) for q in (50, 90, 99)}}


def bench_serving(workdir, levels, requests_per_client, max_tokens, slots=32):
  results = {}
  for slot_count, level_list in ((slots, levels), (1, [max(levels)])):
    proc, url = start_server(workdir, slot_count)
    try:
      asyncio.run(_level(url, min(4, slot_count), 1, 8))  # warm-up (connections, first steps)
      for clients in level_list:
        row = asyncio.run(_level(url, clients, requests_per_client, max_tokens))
        row['slots'] = slot_count
        results[f'slots={slot_count},clients={clients}'] = row
        print(json.dumps(row), flush=True)
    finally:
      proc.kill()
      proc.wait()
  top = max(levels)
  results['batching_gain'] = round(results[f'slots={slots},clients={top}']['tokens_per_s'] /
                                   results[f'slots=1,clients={top}']['tokens_per_s'], 2)
  return results


# ------------------------------------------------------------------ int8


def perplexity(workdir: str, max_windows: int) -> dict:
  """Validation loss of the float32 and the int8 weights on the same windows."""
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  cfg, params, _ = checkpoint.load_model(workdir)
  seq_len = min(config.data.seq_len, cfg.max_len)
  tokens = data.token_stream(config.data, tokenizer, workdir, config.data.val_split)
  tokens = tokens[:max_windows * seq_len + 1]
  q = quantize.quantize_params(params)

  @jax.jit
  def loss_sum(p, batch):
    logits, _ = Transformer(cfg).apply({'params': quantize.dequantize(p)}, batch['inputs'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return jnp.sum(losses * batch['weights'])

  out = {'split': config.data.val_split, 'tokens': len(tokens) - 1,
         'float32_bytes': quantize.param_bytes(params), 'int8_bytes': quantize.param_bytes(q)}
  for name, p in (('float32', params), ('int8', q)):
    total = sum(float(loss_sum(p, b)) for b in eval_lib.windows(np.asarray(tokens), seq_len, 32))
    out[f'{name}_loss'] = total / (len(tokens) - 1)
    out[f'{name}_perplexity'] = math.exp(out[f'{name}_loss'])
  out['memory_ratio'] = round(out['float32_bytes'] / out['int8_bytes'], 2)
  out['perplexity_change_pct'] = round(100 * (out['int8_perplexity'] / out['float32_perplexity']
                                              - 1), 3)
  return out


def decode_speed(cfg: ModelConfig, new_tokens: int, repeats: int) -> dict:
  """Greedy tokens/s at batch 1, float32 against int8, and the compiled programs' temp memory."""
  params = jax.jit(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 1), jnp.int32)))(
      jax.random.key(0))['params']
  import flax.linen as nn
  params = nn.unbox(params)
  prompt = [list(np.random.default_rng(0).integers(0, cfg.vocab_size, 16))]
  out = {'model': dataclasses.asdict(cfg), 'new_tokens': new_tokens, 'prompt_tokens': 16}
  reference = None
  for name, p in (('float32', params), ('int8', quantize.quantize_params(params))):
    gen = quantize.generator(cfg, p)
    tokens = gen.generate(prompt, new_tokens, temperature=0)  # compiles
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      gen.generate(prompt, new_tokens, temperature=0)
      times.append(time.perf_counter() - start)
    req = gen._request(prompt, new_tokens, 1, False, None, 0, temperature=0)  # pylint: disable=protected-access
    compiled = gen._generate.lower(gen.params, req.tokens, req.lengths, req.max_new,  # pylint: disable=protected-access
                                   req.dynamic, mode=req.mode, cache_len=req.cache_len).compile()
    memory = compiled.memory_analysis()
    out[name] = {'param_bytes': quantize.param_bytes(p),
                 'tokens_per_s': round(new_tokens / min(times), 2),
                 'seconds': [round(t, 3) for t in times],
                 'temp_bytes': getattr(memory, 'temp_size_in_bytes', None)}
    if reference is None:
      reference = tokens[0]
    else:
      out['same_greedy_tokens_pct'] = round(100 * np.mean(np.array(tokens[0]) ==
                                                          np.array(reference)), 1)
    del gen
    print(json.dumps({name: out[name]}), flush=True)
  out['speedup'] = round(out['int8']['tokens_per_s'] / out['float32']['tokens_per_s'], 2)
  out['memory_ratio'] = round(out['float32']['param_bytes'] / out['int8']['param_bytes'], 2)
  return out


def matvec_formulations(layers: int = 12, emb: int = 768, mlp: int = 3072, repeats: int = 5):
  """How XLA:CPU meets int8 weights at batch 1: `layers` [emb, mlp] matrix-vector products, as a
  float32 dot, as a dot of dequantized int8 (what gpt_jax does), and as a multiply-and-reduce
  over output-major int8 (a formulation whose conversion fuses into the reduction)."""
  rng = np.random.default_rng(0)
  floats = [rng.normal(size=(emb, mlp)).astype(np.float32) for _ in range(layers)]
  quantized = [quantize.quantize_tensor(w, (0,)) for w in floats]
  x = jnp.ones((1, emb))

  def f32(ws, x):
    return sum(x @ w for w in ws)

  def dequantized_dot(qs, x):
    return sum(x @ q.dequantize() for q in qs)

  def output_major_reduce(qs, x):  # q.values.T is [mlp, emb]: the reduction axis is contiguous
    return sum(jnp.sum(v.astype(jnp.float32) * x[0][None, :], axis=1) * s[0]
               for v, s in qs)[None]

  cases = {'float32 dot': (f32, (floats, x)), 'int8, dequantize then dot': (dequantized_dot,
                                                                           (quantized, x)),
           'int8 output-major, multiply-reduce': (output_major_reduce, (
               [(jnp.asarray(np.ascontiguousarray(np.asarray(q.values).T)), q.scale)
                for q in quantized], x))}
  out = {}
  for name, (fn, args) in cases.items():
    jitted = jax.jit(fn)
    args = jax.device_put(args)
    jitted(*args).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jitted(*args).block_until_ready()
      times.append(time.perf_counter() - start)
    memory = jitted.lower(*args).compile().memory_analysis()
    out[name] = {'ms': round(1000 * min(times), 2),
                 'temp_bytes': getattr(memory, 'temp_size_in_bytes', None)}
  print(json.dumps(out), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='A trained workdir.')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--max_tokens', type=int, default=40)
  parser.add_argument('--skip_serving', action='store_true')
  parser.add_argument('--skip_int8', action='store_true')
  parser.add_argument('--out', default=os.path.join(REPO, 'experiments', 'bench_serve',
                                                   'results.json'))
  args = parser.parse_args()
  results = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
             'load_average_start': os.getloadavg(), 'workdir': args.workdir,
             'cpus': os.cpu_count(), 'jax': jax.__version__, 'device': str(jax.devices()[0])}
  if not args.skip_serving:
    results['serving'] = bench_serving(args.workdir, [1, 8, 32], 2 if args.quick else 4,
                                       args.max_tokens)
  if not args.skip_int8:
    results['perplexity'] = perplexity(args.workdir, 64 if args.quick else 100_000)
    print(json.dumps(results['perplexity']), flush=True)
    results['matvec'] = matvec_formulations()
    results['decode_batch1'] = decode_speed(GPT2_124M, 32 if args.quick else 64,
                                            1 if args.quick else 3)
  results['load_average_end'] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'-> {args.out}')


if __name__ == '__main__':
  main()
