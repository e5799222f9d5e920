r"""Soak: gpt_jax.serve under minutes of mixed load, with clients that hang up mid-stream.

  python experiments/bench_serve/soak.py --workdir=runs/shakespeare_char_repro/gpt_jax \
      [--minutes=5 --clients=24 --slots=8 --max_queue=16 --request_timeout=30]

The real binary in a subprocess, with an API key (GPT_JAX_API_KEY) and a small --max_queue so
that overload happens. --clients concurrent clients (httpx, over loopback) each send requests
one after another until the time is up, drawing each at random from

  non-streaming completion | streaming completion read to the end |
  streaming completion abandoned after 1-5 chunks (the client closes the connection) |
  n=2 completion | a request without the key (expected 401) | malformed JSON (expected 400)

and waiting the answer's Retry-After (1 s) after a 429.

Reported (printed and written to experiments/bench_serve/soak.json): requests by kind and
outcome, errors by kind (HTTP status, error code, or the exception a client saw), the server's
resident memory (VmRSS) after warm-up, at its peak (sampled every second) and at the end, and
the /health counts once the load stops: every slot free and nothing waiting, or the run fails.
The server's own output goes to soak.server.log beside soak.json.
Exit status 1 when the server answered a 5xx, exited, or did not free every slot.
"""

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = 'soak-key'
PROMPTS = ['ROMEO:\n', 'First Citizen:\n', 'The ', 'KING HENRY:\nWhat ', 'O, ', 'JULIET:\nI ']
KINDS = ['complete', 'stream', 'abandon', 'n2', 'no_key', 'malformed']
WEIGHTS = [30, 25, 25, 10, 5, 5]
EXPECTED = {'no_key': 401, 'malformed': 400}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def rss_mb(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def start_server(args, log):
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gpt_jax.serve', f'--workdir={args.workdir}', f'--port={port}',
       f'--slots={args.slots}', f'--max_queue={args.max_queue}',
       f'--request_timeout={args.request_timeout}', '--model_name=soak'],
      cwd=REPO, env={**os.environ, 'GPT_JAX_API_KEY': KEY}, stdout=log, stderr=log)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 300
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f'server exited; its log: {log.name}')
    try:
      if httpx.get(f'{url}/health', timeout=1).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.kill()
      raise RuntimeError('server did not start in 300 s')
    time.sleep(0.5)


def _http_error(response) -> str:
  try:
    return f"HTTP {response.status_code} {response.json()['error']['code']}"
  except (ValueError, KeyError, TypeError):
    return f'HTTP {response.status_code} {response.text[:80]!r}'


async def one_request(http: httpx.AsyncClient, kind: str, rng: random.Random, max_tokens: int):
  """(outcome, detail): ('ok', None), ('abandoned', None) or ('error', what went wrong)."""
  body = {'model': 'soak', 'prompt': rng.choice(PROMPTS),
          'max_tokens': rng.randint(1, max_tokens), 'temperature': rng.choice([0, 0.8]),
          'seed': rng.randrange(1 << 30)}
  headers = {'Authorization': f'Bearer {KEY}'}
  if kind in EXPECTED:
    response = await http.post('/v1/completions', json=body if kind == 'no_key' else None,
                               content=b'{"model": ' if kind == 'malformed' else None,
                               headers={} if kind == 'no_key' else
                               {**headers, 'content-type': 'application/json'})
    if response.status_code == EXPECTED[kind]:
      return 'ok', None
    return 'error', f'HTTP {response.status_code}'
  if kind == 'n2':
    body['n'] = 2
  if kind in ('complete', 'n2'):
    response = await http.post('/v1/completions', json=body, headers=headers)
    if response.status_code != 200:
      return 'error', _http_error(response)
    choices = response.json()['choices']
    ok = len(choices) == body.get('n', 1) and all(c['finish_reason'] for c in choices)
    return ('ok', None) if ok else ('error', 'incomplete response')
  body['stream'] = True
  hang_up_after = rng.randint(1, 5) if kind == 'abandon' else None
  async with http.stream('POST', '/v1/completions', json=body, headers=headers) as response:
    if response.status_code != 200:
      await response.aread()
      return 'error', _http_error(response)
    events = 0
    async for line in response.aiter_lines():
      if not line:
        continue
      events += 1
      if line.startswith('data: {"error"'):
        return 'error', f"stream {json.loads(line[6:])['error']['code']}"
      if hang_up_after and events >= hang_up_after:
        return 'abandoned', None  # leaving the block closes the connection mid-stream
      if line == 'data: [DONE]':
        return 'ok', None
  return 'error', 'stream ended without [DONE]'


async def client_loop(url, seconds, seed, max_tokens, counts, errors):
  rng = random.Random(seed)
  end = time.monotonic() + seconds
  async with httpx.AsyncClient(base_url=url, timeout=120) as http:
    while time.monotonic() < end:
      kind = rng.choices(KINDS, WEIGHTS)[0]
      try:
        outcome, detail = await one_request(http, kind, rng, max_tokens)
      except (httpx.HTTPError, ValueError, KeyError) as e:
        outcome, detail = 'error', f'{kind}: {type(e).__name__}: {e}'[:120]
      counts[kind, outcome] += 1
      if detail:
        errors[detail] += 1
      if detail and detail.startswith('HTTP 429'):
        await asyncio.sleep(1)  # as the answer's Retry-After says (and the openai client does)


async def soak(url, proc, args):
  counts, errors, rss = collections.Counter(), collections.Counter(), []

  async def sample_memory():
    while True:
      rss.append(rss_mb(proc.pid))
      await asyncio.sleep(1)

  sampler = asyncio.create_task(sample_memory())
  start = time.perf_counter()
  await asyncio.gather(*[client_loop(url, args.minutes * 60, c, args.max_tokens, counts, errors)
                         for c in range(args.clients)])
  wall = time.perf_counter() - start
  sampler.cancel()
  return counts, errors, rss, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--minutes', type=float, default=5)
  parser.add_argument('--clients', type=int, default=24)
  parser.add_argument('--slots', type=int, default=8)
  parser.add_argument('--max_queue', type=int, default=16)
  parser.add_argument('--request_timeout', type=float, default=30)
  parser.add_argument('--max_tokens', type=int, default=40)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'soak.json'))
  args = parser.parse_args()

  log = open(args.out.removesuffix('.json') + '.server.log', 'w', encoding='utf-8')
  proc, url = start_server(args, log)
  try:
    asyncio.run(soak(url, proc, argparse.Namespace(**{**vars(args), 'minutes': 0.1})))  # warm-up
    rss_start = rss_mb(proc.pid)
    counts, errors, rss, wall = asyncio.run(soak(url, proc, args))
    deadline = time.time() + 30
    while True:  # abandoned streams free their slots at the engine's next step
      health = httpx.get(f'{url}/health', timeout=5).json()
      if (health['busy_slots'] == 0 and health['waiting'] == 0) or time.time() > deadline:
        break
      time.sleep(0.1)
    rss_end = rss_mb(proc.pid)
    alive = proc.poll() is None
  finally:
    proc.kill()
    proc.wait()
    log.close()

  by_kind = {kind: {outcome: n for (k, outcome), n in sorted(counts.items()) if k == kind}
             for kind in KINDS}
  served = sum(n for (kind, outcome), n in counts.items() if outcome == 'ok')
  result = {
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'args': vars(args),
      'seconds': round(wall, 1), 'requests': sum(counts.values()), 'served_as_expected': served,
      'abandoned_mid_stream': sum(n for (_, o), n in counts.items() if o == 'abandoned'),
      'by_kind': by_kind, 'errors': dict(errors.most_common()),
      'rss_mb': {'start': round(rss_start, 1), 'peak': round(max(rss), 1),
                 'end': round(rss_end, 1)},
      'health_at_end': health, 'server_alive': alive,
      'load_average': os.getloadavg()}
  print(json.dumps(result, indent=1))
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  failed = (not alive or health['busy_slots'] or health['waiting'] or
            any(detail.startswith(('HTTP 5', 'stream generation')) for detail in errors))
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
