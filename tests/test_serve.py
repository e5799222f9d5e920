"""The OpenAI-compatible server, driven by the official openai client: completions, chat,
streaming, n, stop, seeds; batching invariance; bad requests; disconnects; a bounded load test."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from fastapi import testclient

from conftest import REPO, module_env, train
from gpt_jax import chat_template, serve, tokenizer as tokenizer_lib

SLOTS = 8
# A byte-level tiny model; vocab_size leaves room for the chat tokens. Greedy decoding of a model
# this briefly trained is deterministic, which is all batching invariance needs.
RUN = {'data.tokenizer': 'byte', 'model.vocab_size': 264, 'model.max_len': 128,
       'train.num_steps': 20, 'train.eval_every': 0}
PROMPTS = ['The ', 'def f(x):\n', 'import os', 'In Python, a list', 'x', 'class A:\n  ',
           'Return the ', '1 + 2 = ']


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory, tfds_dir):
  """(plain workdir, the same model with the chat tokens in its tokenizer)."""
  plain = str(tmp_path_factory.mktemp('plain'))
  train(plain, tfds_dir, **RUN)
  chat = str(tmp_path_factory.mktemp('srv') / 'tiny-chat')
  shutil.copytree(plain, chat)
  tokenizer = tokenizer_lib.load(os.path.join(chat, 'tokenizer'))
  chat_template.add_chat_tokens(tokenizer).save(os.path.join(chat, 'tokenizer'))
  return plain, chat


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(workdirs):
  """(base URL, process) of a server on the chat workdir, killed at teardown."""
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gpt_jax.serve', f'--workdir={workdirs[1]}', '--host=127.0.0.1',
       f'--port={port}', f'--slots={SLOTS}'], cwd=REPO, env=module_env(),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 120
  try:
    while True:
      if proc.poll() is not None:
        raise AssertionError(f'gpt_jax.serve exited ({proc.returncode}):\n{proc.stdout.read()}')
      try:
        if httpx.get(f'{url}/health', timeout=1).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      assert time.time() < deadline, 'the server did not come up in 120 s'
      time.sleep(0.3)
    yield url, proc
  finally:
    proc.kill()
    proc.wait()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'{server[0]}/v1', api_key='x', max_retries=0, timeout=60)


MODEL = 'tiny-chat'


def health(url) -> dict:
  return httpx.get(f'{url}/health', timeout=5).json()


def test_models_completion_and_chat(client):
  assert [m.id for m in client.models.list().data] == [MODEL]
  out = client.completions.create(model=MODEL, prompt='The ', max_tokens=12, temperature=0)
  assert out.object == 'text_completion' and len(out.choices) == 1
  assert out.choices[0].finish_reason in ('length', 'stop')
  assert out.usage.prompt_tokens == 4  # bytes
  assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == 'stop'
  assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
  again = client.completions.create(model=MODEL, prompt='The ', max_tokens=12, temperature=0)
  assert again.choices[0].text == out.choices[0].text

  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                        temperature=0)
  assert chat.object == 'chat.completion'
  assert chat.choices[0].message.role == 'assistant'
  assert isinstance(chat.choices[0].message.content, str)
  # <|system|> Be brief. <|end|> <|user|> Hi <|end|> <|assistant|>
  assert chat.usage.prompt_tokens == 1 + 9 + 1 + 1 + 2 + 1 + 1
  # Without max_tokens, a chat completion may use the rest of the context.
  rest = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, seed=1)
  assert rest.usage.total_tokens <= 128


def test_streaming_equals_the_whole_response(client, server):
  kwargs = dict(model=MODEL, prompt='import ', max_tokens=20, temperature=0.9, seed=7)
  whole = client.completions.create(**kwargs)
  chunks = list(client.completions.create(stream=True, stream_options={'include_usage': True},
                                          **kwargs))
  assert ''.join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
      whole.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

  messages = [{'role': 'user', 'content': 'Hello'}]
  whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, seed=3)
  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15,
                                               seed=3, stream=True))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == \
      whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

  # The raw stream: Server-Sent Events, each a JSON chunk, ending with [DONE].
  with httpx.stream('POST', f'{server[0]}/v1/completions', timeout=30, json={
      'model': MODEL, 'prompt': 'a', 'max_tokens': 5, 'stream': True}) as response:
    assert response.headers['content-type'].startswith('text/event-stream')
    events = [line[len('data: '):] for line in response.iter_lines() if line]
  assert events[-1] == '[DONE]'
  assert all(json.loads(e)['object'] == 'text_completion' for e in events[:-1])


def test_n_seed_and_stop(client):
  kwargs = dict(model=MODEL, prompt='The ', max_tokens=24, temperature=1.0, seed=11)
  three = client.completions.create(n=3, **kwargs)
  texts = [c.text for c in three.choices]
  assert [c.index for c in three.choices] == [0, 1, 2]
  assert len(set(texts)) == 3  # independent samples
  assert texts == [c.text for c in client.completions.create(n=3, **kwargs).choices]
  assert client.completions.create(n=1, **kwargs).choices[0].text == texts[0]
  assert three.usage.prompt_tokens == 4
  lengths = 24 if all(c.finish_reason == 'length' for c in three.choices) else None
  assert three.usage.completion_tokens == 3 * lengths if lengths else \
      three.usage.completion_tokens < 3 * 24
  assert client.completions.create(**{**kwargs, 'seed': 12}).choices[0].text != texts[0]

  # Stop strings: the text ends before the first one, which it does not include.
  text = texts[0]
  stop = next(text[i:i + 2] for i in range(4, len(text) - 2)
              if text[i:i + 2].isprintable() and '\ufffd' not in text[i:i + 2])
  cut = client.completions.create(n=1, stop=[stop, '@@never@@'], **kwargs).choices[0]
  assert cut.text == text[:text.index(stop)] and cut.finish_reason == 'stop'
  chunks = list(client.completions.create(n=1, stop=stop, stream=True, **kwargs))
  assert ''.join(c.choices[0].text for c in chunks) == cut.text


def test_batched_greedy_equals_single_requests(client, server):
  def one(i):
    return client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=6 + 3 * i,
                                     temperature=0).choices[0].text

  steps = health(server[0])['steps']
  single = [one(i) for i in range(len(PROMPTS))]
  sequential_steps = health(server[0])['steps'] - steps
  results = [None] * len(PROMPTS)
  barrier = threading.Barrier(len(PROMPTS))

  def run(i):
    barrier.wait()
    results[i] = one(i)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
  steps = health(server[0])['steps']
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == single
  # The requests shared the decode steps (one request alone needs at most 6 + 3 * 7 steps).
  assert health(server[0])['steps'] - steps < sequential_steps * 0.7


BAD = [  # (body, status, param)
    ('{"model": "tiny-chat", "prompt": "x"', 400, None),                    # malformed JSON
    ('[1, 2]', 400, None),                                                  # not an object
    ({'model': MODEL}, 400, 'prompt'),                                      # missing field
    ({'prompt': 'x'}, 400, 'model'),
    ({'model': MODEL, 'prompt': 'x', 'max_tokens': '5'}, 400, 'max_tokens'),  # wrong type
    ({'model': MODEL, 'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens'),
    ({'model': MODEL, 'prompt': 'x', 'temperature': 3}, 400, 'temperature'),
    ({'model': MODEL, 'prompt': 'x', 'top_p': 0}, 400, 'top_p'),
    ({'model': MODEL, 'prompt': 'x', 'n': 100}, 400, 'n'),
    ({'model': MODEL, 'prompt': 'x', 'stream': 'yes'}, 400, 'stream'),
    ({'model': MODEL, 'prompt': 'x', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'stop'),
    ({'model': MODEL, 'prompt': [1, 99999]}, 400, 'prompt'),
    ({'model': MODEL, 'prompt': 'x' * 100, 'max_tokens': 50}, 400, 'max_tokens'),  # > context
    ({'model': MODEL, 'prompt': 'x' * 130}, 400, 'prompt'),
    ({'model': 'gpt-4', 'prompt': 'x'}, 404, 'model'),                      # unknown model
]
BAD_CHAT = [
    ({'model': MODEL}, 400, 'messages'),
    ({'model': MODEL, 'messages': []}, 400, 'messages'),
    ({'model': MODEL, 'messages': [{'role': 'robot', 'content': 'hi'}]}, 400, 'messages'),
    ({'model': MODEL, 'messages': [{'role': 'user', 'content': 5}]}, 400, 'messages'),
    ({'model': MODEL, 'messages': [{'role': 'user', 'content': 'x' * 200}]}, 400, 'messages'),
    ({'model': MODEL, 'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 200}, 400,
     'max_tokens'),
]


def _post(url, path, body):
  content = body if isinstance(body, str) else json.dumps(body)
  return httpx.post(url + path, content=content, headers={'content-type': 'application/json'},
                    timeout=30)


def check_error(response, status, param):
  assert response.status_code == status, response.text
  error = response.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'}
  assert error['param'] == param and error['message'] and error['type']
  return error['message']


def test_bad_requests_get_4xx_naming_the_problem(server, client):
  url = server[0]
  for body, status, param in BAD:
    message = check_error(_post(url, '/v1/completions', body), status, param)
    assert param is None or param in message
  for body, status, param in BAD_CHAT:
    check_error(_post(url, '/v1/chat/completions', body), status, param)
  assert 'JSON' in _post(url, '/v1/completions', BAD[0][0]).json()['error']['message']
  check_error(httpx.get(f'{url}/v1/nowhere'), 404, None)
  # The openai client raises its typed errors from these bodies.
  with pytest.raises(openai.NotFoundError, match='does not exist'):
    client.completions.create(model='gpt-4', prompt='x')
  with pytest.raises(openai.BadRequestError, match='context length'):
    client.completions.create(model=MODEL, prompt='x' * 120, max_tokens=20)
  assert client.completions.create(model=MODEL, prompt='x', max_tokens=3).usage.total_tokens == 4


def test_disconnect_mid_stream_frees_the_slot(server):
  url = server[0]
  steps = health(url)['steps']
  with httpx.stream('POST', f'{url}/v1/completions', timeout=30, json={
      'model': MODEL, 'prompt': 'x', 'max_tokens': 120, 'stream': True,
      'temperature': 0}) as response:
    next(response.iter_lines())  # the first token, then hang up
  deadline = time.time() + 10
  while health(url)['busy_slots'] and time.time() < deadline:
    time.sleep(0.02)
  assert health(url)['busy_slots'] == 0
  assert health(url)['steps'] - steps < 120  # freed before it ran to max_tokens


def _rss_mb(pid) -> float:
  with open(f'/proc/{pid}/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


async def _load(url, count):
  """count concurrent requests (completion and chat, streaming and not), with malformed requests
  in between; returns (texts of the greedy completions by prompt, malformed statuses)."""
  client = openai.AsyncOpenAI(base_url=f'{url}/v1', api_key='x', max_retries=0, timeout=120)

  async def request(i):
    prompt, stream, chat = PROMPTS[i % len(PROMPTS)], i % 2 == 0, i % 4 == 1
    if chat:
      kwargs = dict(model=MODEL, messages=[{'role': 'user', 'content': prompt}], max_tokens=16,
                    temperature=0.7, seed=i)
      if stream:
        text = ''.join([c.choices[0].delta.content or '' async for c in
                        await client.chat.completions.create(stream=True, **kwargs)])
      else:
        out = await client.chat.completions.create(**kwargs)
        assert out.choices[0].finish_reason in ('stop', 'length') and out.usage.total_tokens > 0
        text = out.choices[0].message.content
      return ('chat', i, text)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    if stream:
      chunks = [c async for c in await client.completions.create(stream=True, **kwargs)]
      assert chunks[-1].choices[0].finish_reason in ('stop', 'length')
      text = ''.join(c.choices[0].text for c in chunks)
    else:
      out = await client.completions.create(**kwargs)
      assert out.usage.completion_tokens <= 16
      text = out.choices[0].text
    return ('completion', prompt, text)

  async def malformed(i):
    async with httpx.AsyncClient(timeout=60) as http:
      body = BAD[i % len(BAD)][0]
      response = await http.post(f'{url}/v1/completions', content=body if isinstance(body, str)
                                 else json.dumps(body), headers={'content-type': 'application/json'})
      return response.status_code

  tasks = [request(i) for i in range(count)] + [malformed(i) for i in range(count // 2)]
  results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
  await client.close()
  return results[:count], results[count:]


def test_load_64_concurrent_requests_with_malformed_ones(server, client):
  url, proc = server
  reference = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                            temperature=0).choices[0].text for p in PROMPTS}
  rss = []
  for _ in range(2):
    results, statuses = asyncio.run(_load(url, 64))
    rss.append(_rss_mb(proc.pid))
    assert len(results) == 64  # none lost
    for kind, key, text in results:
      assert isinstance(text, str)
      if kind == 'completion':
        assert text == reference[key]  # unchanged by the batch around it
    assert all(400 <= s < 500 for s in statuses)
  assert health(url)['busy_slots'] == 0 and health(url)['waiting'] == 0
  assert rss[1] - rss[0] < 50, f'server memory grew from {rss[0]:.0f} to {rss[1]:.0f} MB'


def test_model_without_chat_tokens_and_int8_weights(workdirs):
  """In-process: the plain workdir, int8 weights; chat is a clear 400, completions work."""
  server = serve.load(workdirs[0], quantize_mode='int8', slots=2)
  try:
    with testclient.TestClient(serve.create_app(server)) as http:
      response = http.post('/v1/chat/completions', json={
          'model': server.model_name, 'messages': [{'role': 'user', 'content': 'Hi'}]})
      assert 'no chat template' in check_error(response, 400, 'messages')
      response = http.post('/v1/completions', json={
          'model': server.model_name, 'prompt': 'The ', 'max_tokens': 8, 'temperature': 0})
      assert response.status_code == 200
      assert response.json()['usage']['completion_tokens'] <= 8
  finally:
    server.engine.stop()
