"""The OpenAI-compatible server, driven by the official openai client: completions, chat,
streaming, n, stop, seeds; batching invariance; bad requests; disconnects; a bounded load test."""

import asyncio
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import hypothesis
from hypothesis import strategies as st
import openai
import pytest
from fastapi import testclient

from conftest import REPO, module_env, train
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.inference import server as server_lib
from gpt_jax.sft import chat_template
from gpt_jax.inference import engine

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


# -------------------------------------------------------------------- facing a network


@pytest.fixture(scope='module')
def local(workdirs):
  """An in-process Server on the chat workdir, int8 weights, 2 slots (limits set per test)."""
  server = server_lib.load(workdirs[1], quantize_mode='int8', slots=2)
  yield server
  server.engine.stop()


def test_model_without_chat_tokens_and_int8_weights(local, workdirs):
  """The same int8 engine behind the plain workdir's tokenizer: chat is a clear 400,
  completions work."""
  plain = server_lib.Server(local.engine, tokenizer_lib.load(os.path.join(workdirs[0], 'tokenizer')),
                       'plain')
  with testclient.TestClient(server_lib.create_app(plain)) as http:
    response = http.post('/v1/chat/completions', json={
        'model': 'plain', 'messages': [{'role': 'user', 'content': 'Hi'}]})
    assert 'no chat template' in check_error(response, 400, 'messages')
    response = http.post('/v1/completions', json={
        'model': 'plain', 'prompt': 'The ', 'max_tokens': 8, 'temperature': 0})
    assert response.status_code == 200
    assert response.json()['usage']['completion_tokens'] <= 8


def _hold_slots(server, count, seconds_per_token=0.02):
  """`count` sequences submitted straight to the engine, each slowing every step it is in and
  running until cancelled (or to the end of the context: 2.5 s)."""
  seqs = [engine.Sequence([1, 2], server.context - 2,
                           lambda _: time.sleep(seconds_per_token) or False,
                           lambda reason, error: None, temperature=0) for _ in range(count)]
  for seq in seqs:
    server.engine.submit(seq)
  return seqs


def _until(condition, timeout=10):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.01)


def _release(server, seqs):
  for seq in seqs:
    seq.cancel()
  _until(lambda: server.engine.busy_slots == 0 and server.engine.waiting == 0)


def test_api_key_guards_every_endpoint_but_health(local, workdirs):
  body = {'model': 'tiny-chat', 'prompt': 'The ', 'max_tokens': 3, 'temperature': 0}
  with testclient.TestClient(server_lib.create_app(local, api_key='s3cret')) as http:
    assert http.get('/health').status_code == 200
    for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret'},
                    {'Authorization': 'Basic s3cret'}, {'Authorization': 'Bearer s3cret-'}):
      for method, path in (('GET', '/v1/models'), ('POST', '/v1/completions'),
                           ('GET', '/v1/nowhere')):
        response = http.request(method, path, json=body, headers=headers)
        assert 'API key' in check_error(response, 401, None)
        assert response.json()['error']['code'] == 'invalid_api_key'
        assert response.headers['WWW-Authenticate'] == 'Bearer'
    key = {'Authorization': 'Bearer s3cret'}
    assert http.get('/v1/models', headers=key).json()['data'][0]['id'] == 'tiny-chat'
    assert http.post('/v1/completions', json=body, headers=key).json()['usage'][
        'completion_tokens'] == 3
    # The openai client sends its api_key this way.
    client = openai.OpenAI(base_url='http://testserver/v1', api_key='s3cret', http_client=http,
                           max_retries=0)
    assert client.completions.create(**body).usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError, match='API key'):
      openai.OpenAI(base_url='http://testserver/v1', api_key='nope', http_client=http,
                    max_retries=0).models.list()

  # The binary: a key from the environment; a warning when listening beyond loopback without one.
  def start(host, key):
    env = {**module_env(), 'GPT_JAX_API_KEY': key}
    return subprocess.Popen([sys.executable, '-m', 'gpt_jax.serve', f'--host={host}',
                             f'--workdir={workdirs[1]}-missing'], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  runs = [start('0.0.0.0', ''), start('0.0.0.0', 'k')]
  outputs = [proc.communicate(timeout=60)[1].strip().splitlines() for proc in runs]
  missing = f'error: Workdir {workdirs[1]}-missing does not exist'
  assert outputs[0] == ['warning: serving on 0.0.0.0 without an API key: anyone who can reach '
                        'port 8000 can use the model (set GPT_JAX_API_KEY or --api_key).', missing]
  assert outputs[1] == [missing]


def test_a_full_queue_answers_429_with_retry_after(local):
  local.max_queue = 1
  held = _hold_slots(local, 3)  # two in the slots, one waiting: the queue is full
  try:
    _until(lambda: local.engine.busy_slots == 2 and local.engine.waiting == 1)
    with testclient.TestClient(server_lib.create_app(local)) as http:
      body = {'model': 'tiny-chat', 'prompt': 'The ', 'max_tokens': 3}
      response = http.post('/v1/completions', json=body)
      assert 'busy' in check_error(response, 429, None)
      assert response.headers['Retry-After'] == '1'
      assert response.json()['error']['type'] == 'rate_limit_error'
      # More choices than slots and queue together can never be served: 400, not 429.
      assert 'holds at most 3' in check_error(http.post('/v1/completions', json={**body, 'n': 4}),
                                              400, 'n')
      assert local.engine.waiting == 1  # nothing was queued
      _release(local, held)
      assert http.post('/v1/completions', json={**body, 'n': 3}).status_code == 200
  finally:
    local.max_queue = 1024
    _release(local, held)


def test_request_timeout_ends_waiting_and_running_requests_and_frees_slots(local):
  local.request_timeout = 0.5
  held = _hold_slots(local, 2)
  try:
    _until(lambda: local.engine.busy_slots == 2)
    with testclient.TestClient(server_lib.create_app(local)) as http:
      body = {'model': 'tiny-chat', 'prompt': 'The ', 'max_tokens': 100, 'temperature': 0}
      start = time.perf_counter()
      response = http.post('/v1/completions', json=body)
      assert 0.5 <= time.perf_counter() - start < 5
      assert 'within the server\'s --request_timeout of 0.5 s (while waiting for a slot)' in \
          check_error(response, 408, None)
      assert response.json()['error']['code'] == 'request_timeout'
      _until(lambda: local.engine.waiting == 0)  # it left the queue

      held[0].cancel()  # one slot free; the other sequence slows every step to >= 20 ms
      _until(lambda: local.engine.busy_slots == 1)
      message = check_error(http.post('/v1/completions', json=body), 408, None)
      assert 'tokens); it was ended and its slots freed' in message
      _until(lambda: local.engine.busy_slots == 1)  # its slot is free again
      with http.stream('POST', '/v1/completions', json={**body, 'stream': True}) as response:
        assert response.status_code == 200
        events = [line[len('data: '):] for line in response.iter_lines() if line]
      assert events[-1] == '[DONE]'
      assert json.loads(events[-2])['error']['code'] == 'request_timeout'
      assert all('choices' in json.loads(e) for e in events[:-2])
      _until(lambda: local.engine.busy_slots == 1)
  finally:
    local.request_timeout = 600
    _release(local, held)


# -------------------------------------------------------------------- fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([
        0, -1, 2**31, 2**63, 10**30, -10**30]) | st.floats(allow_nan=False) |
    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0]) | st.text() |
    st.sampled_from(['', '\x00', '\x1b[2J', '\u202e\u200b', '😀' * 50, 'a' * 10_000, '\ufffd']),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)
RAW_BODIES = [
    b'', b'{', b'null', b'[]', b'"x"', b'1e999', b'NaN', b'{"model": NaN, "prompt": "x"}',
    b'{"model": "tiny-chat", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny-chat", "prompt": "x", "top_p": Infinity}',
    b'{"model": "tiny-chat", "prompt": "\\ud800"}',  # a lone surrogate
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"model": "tiny-chat", "prompt": "\xff\xfe\xfa"}',  # not UTF-8
    b'\xef\xbb\xbf{"model": "tiny-chat", "prompt": "x"}',  # a byte order mark
    b'[' * 100_000 + b']' * 100_000,
    b'{"model": "tiny-chat", "prompt": "x", "max_tokens": 1' + b'0' * 5000 + b'}',
    b'{"model": "tiny-chat", "prompt": "x", "model": 5}',
    b' ' * (server_lib.MAX_BODY_BYTES + 1)]


def _from_schema(schema, components):
  """Values valid under an OpenAPI (JSON Schema) node, for the forms FastAPI's schema uses."""
  if '$ref' in schema:
    return _from_schema(components[schema['$ref'].rsplit('/', 1)[1]], components)
  if 'anyOf' in schema:
    return st.one_of([_from_schema(s, components) for s in schema['anyOf']])
  kind = schema.get('type')
  if kind == 'object' and 'properties' in schema:
    required = set(schema.get('required', ()))
    return st.fixed_dictionaries(
        {k: _from_schema(v, components) for k, v in schema['properties'].items() if k in required},
        optional={k: _from_schema(v, components) for k, v in schema['properties'].items()
                  if k not in required})
  if kind == 'object':
    values = _from_schema(schema.get('additionalProperties', {}), components)
    return st.dictionaries(st.text(max_size=16), values, max_size=3)
  if kind == 'array':
    return st.lists(_from_schema(schema.get('items', {}), components), max_size=5)
  if kind == 'integer':
    return st.integers(min_value=schema.get('minimum') and int(schema['minimum']),
                       max_value=schema.get('maximum') and int(schema['maximum']))
  if kind == 'number':
    return st.floats(schema.get('minimum', schema.get('exclusiveMinimum')),
                     schema.get('maximum'), exclude_min='exclusiveMinimum' in schema,
                     allow_nan=False)
  simple = {'string': st.text(), 'boolean': st.booleans(), 'null': st.none()}
  return simple.get(kind, JSON_VALUES)


def _schema_bodies(spec, name):
  """Request bodies valid under the server's OpenAPI schema for `name`, half of them naming the
  served model; at most 2 prompts, n <= 2 and max_tokens <= 3 (decoding is not what is fuzzed)."""

  def shape(body, named):
    for key in ('max_tokens', 'max_completion_tokens'):
      if isinstance(body.get(key), int):
        body[key] = min(body[key], 3)
    body['n'] = min(body.get('n', 1), 2)
    if isinstance(body.get('prompt'), list) and body['prompt'] and \
        not isinstance(body['prompt'][0], int):
      body['prompt'] = body['prompt'][:2]
    if name == 'ChatRequest' and not body.get('max_completion_tokens'):
      body['max_tokens'] = min(body.get('max_tokens') or 3, 3)  # not the rest of the context
    if named:
      body['model'] = 'tiny-chat'
    return body
  components = spec['components']['schemas']
  return st.builds(shape, _from_schema(components[name], components), st.booleans())


def _mutated(bodies):
  """A schema body with one field set to any JSON value, or an unknown field added."""
  return st.builds(lambda body, key, value: {**body, key: value}, bodies,
                   st.sampled_from(['model', 'prompt', 'messages', 'max_tokens', 'temperature',
                                    'top_p', 'n', 'stop', 'seed', 'stream', 'stream_options',
                                    'echo', 'max_completion_tokens', 'user', 'logit_bias']) |
                   st.text(max_size=12), JSON_VALUES)


def test_fuzz_1200_requests_from_the_openapi_schema_and_around_it(local):
  """Schema-valid bodies, mutated ones, raw bytes (not JSON, not UTF-8, lone surrogates, deep
  nesting, oversized), odd headers, methods and paths: never a 5xx, and afterwards valid requests
  are answered as before."""
  app = server_lib.create_app(local)
  spec = app.openapi()
  paths = {'/v1/completions': 'CompletionRequest', '/v1/chat/completions': 'ChatRequest'}
  bodies = {path: _schema_bodies(spec, name) for path, name in paths.items()}
  reference = {'model': 'tiny-chat', 'prompt': 'The ', 'max_tokens': 6, 'temperature': 0}
  statuses = collections.Counter()
  with testclient.TestClient(app) as http:
    before = http.post('/v1/completions', json=reference).json()['choices'][0]['text']

    def send(method, path, content, content_type='application/json'):
      response = http.request(method, path, content=content,
                              headers={'content-type': content_type})
      statuses[response.status_code] += 1
      assert response.status_code < 500, (method, path, response.text[:300])
      if response.status_code >= 400:
        check_error(response, response.status_code, response.json()['error']['param'])
      return response

    @hypothesis.settings(max_examples=1200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.data())
    def fuzz(data):
      path = data.draw(st.sampled_from(list(paths)))
      # A third schema bodies: enough valid requests, whatever else the draws give, to check
      # that they are answered.
      kind = data.draw(st.sampled_from(['schema', 'schema', 'mutated', 'mutated', 'raw', 'other']))
      if kind == 'raw':
        raw = data.draw(st.integers(0, len(RAW_BODIES) - 1) | st.binary(max_size=200))
        send('POST', path, RAW_BODIES[raw] if isinstance(raw, int) else raw)
      elif kind == 'other':
        send(data.draw(st.sampled_from(['GET', 'PUT', 'DELETE', 'POST'])),
             data.draw(st.sampled_from(['/v1/models/x', '/v1/nowhere', '/v1', '/', path])),
             json.dumps(data.draw(JSON_VALUES)).encode(),
             data.draw(st.sampled_from(['text/plain', 'application/json', '', 'x/\x7f'])))
      else:
        body = data.draw(bodies[path] if kind == 'schema' else _mutated(bodies[path]))
        send('POST', path, json.dumps(body).encode())

    fuzz()  # pylint: disable=no-value-for-parameter
    chunked = (b' ' * (1 << 20) for _ in range(5))  # no Content-Length: counted as it arrives
    assert 'exceeds' in check_error(send('POST', '/v1/completions', chunked), 413, None)
    assert sum(statuses.values()) >= 1200
    assert statuses[200] >= 50, statuses  # the schema's valid requests were answered, too
    _until(lambda: local.engine.busy_slots == 0 and local.engine.waiting == 0)
    assert http.post('/v1/completions', json=reference).json()['choices'][0]['text'] == before


def test_garbage_on_the_socket_leaves_the_server_serving(server, client):
  """Below HTTP: bytes that are not a request, invalid UTF-8 in the request line and headers, a
  body cut short, a connection closed mid-request; then the server answers as before."""
  url, proc = server
  port = int(url.rsplit(':', 1)[1])
  before = client.completions.create(model=MODEL, prompt='The ', max_tokens=5,
                                     temperature=0).choices[0].text
  junk = [b'\x00\xff' * 100 + b'\r\n\r\n', b'GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n',
          b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-\xff: \xfe\r\n\r\n',
          b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"mod',
          b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n',
          b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n',
          b'GET /health HTTP/1.1\r\n' + b'X: ' + b'a' * 100_000 + b'\r\n\r\n', b'POST']
  for data in junk:
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
      s.sendall(data)
      s.shutdown(socket.SHUT_WR)
      try:
        reply = s.recv(100)
      except (ConnectionResetError, TimeoutError):
        reply = b''
      assert not reply.startswith(b'HTTP/1.1 5'), (data[:60], reply)
  assert proc.poll() is None
  assert health(url)['busy_slots'] == 0
  assert client.completions.create(model=MODEL, prompt='The ', max_tokens=5,
                                   temperature=0).choices[0].text == before
