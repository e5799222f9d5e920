r"""An OpenAI-compatible HTTP API over a workdir: batched, streaming, robust to bad requests.
`python -m gpt_jax.serve` runs it:

  from openai import OpenAI
  client = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused')
  client.completions.create(model='default', prompt='The ', max_tokens=50, temperature=0)
  client.chat.completions.create(model='default', messages=[{'role': 'user', 'content': 'Hi'}])

Endpoints: POST /v1/completions, POST /v1/chat/completions (the chat template of
gpt_jax/sft/chat_template.py; a model without its tokens answers 400), GET /v1/models, GET /health.
Request fields: prompt / messages, max_tokens (max_completion_tokens), temperature, top_p, n,
stop, seed, stream (Server-Sent Events ending with `data: [DONE]`), stream_options.include_usage.
Responses carry `usage` token counts.

Requests arriving together share the jitted decode: the engine (gpt_jax/inference/engine.py)
batches every choice of every request over --slots cache rows (continuous batching), and a
choice's tokens do not depend on what else is in the batch. Bad requests (malformed JSON, missing fields, wrong
types, values out of range, prompt + max_tokens beyond the context, an unknown model) get a 4xx
with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; a client that
disconnects mid-stream frees its slots.

Facing a network: with --api_key (or GPT_JAX_API_KEY) every endpoint but /health requires
`Authorization: Bearer <key>` (401 otherwise); at most --max_queue choices wait for a slot and a
request beyond that gets 429 with Retry-After; a request that waits or runs longer than
--request_timeout seconds is ended with a 408 (or an error event in its stream) and its slot
freed; a body over MAX_BODY_BYTES gets 413.
"""

import asyncio
import hmac
import json
import os
import secrets
import time
import uuid
from typing import Any

import fastapi
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
import pydantic
from starlette import exceptions as starlette_exceptions

from gpt_jax import checkpoint, decode
from gpt_jax.sft import chat_template
from gpt_jax.inference import quantize
from gpt_jax.inference import engine
from gpt_jax import sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError

MAX_N = 16     # choices per request
MAX_STOP = 4   # stop strings per request (as OpenAI)
MAX_BODY_BYTES = 4 << 20  # a request body beyond this is refused before it is read whole


class APIError(Exception):
  """An error answered with an OpenAI-style body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = 'invalid_request_error',
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = (status, message, param, code,
                                                                   kind)
    self.headers = headers


def error_body(message: str, kind: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None) -> dict:
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


def _validation_error(exc: fastapi_exceptions.RequestValidationError) -> APIError:
  """The first problem pydantic found, as one sentence naming the field."""
  errors = exc.errors()
  if not errors:
    return APIError(400, 'Invalid request body.')
  first = errors[0]
  if first.get('type') == 'json_invalid':
    detail = (first.get('ctx') or {}).get('error', '')
    return APIError(400, f'The request body is not valid JSON ({detail}).', code='invalid_json')
  loc = [str(part) for part in first.get('loc', ()) if part != 'body']
  param = loc[0] if loc else None  # the request's field (nested places are in the message)
  if first.get('type') == 'missing':
    return APIError(400, f"Missing required parameter: '{param}'.", param, 'missing_required')
  if first.get('type') == 'model_attributes_type' or not loc:
    return APIError(400, 'The request body must be a JSON object.', None, 'invalid_type')
  value = first.get('input')
  shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
  return APIError(400, f"Invalid value for '{param}': {first.get('msg')} (got {shown}).", param,
                  'invalid_value')


def _jsonable(value) -> bool:
  try:
    json.dumps(value)
    return True
  except (TypeError, ValueError):
    return False


# -------------------------------------------------------------------- request bodies


class _Request(pydantic.BaseModel):
  # strict: "5" is not a number, "true" not a boolean (as OpenAI's API).
  model_config = pydantic.ConfigDict(strict=True, extra='ignore')
  model: str
  max_tokens: int | None = pydantic.Field(None, ge=1)
  temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  n: int = pydantic.Field(1, ge=1, le=MAX_N)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: dict[str, bool] | None = None
  user: str | None = None

  @pydantic.field_validator('stop')
  @classmethod
  def _stop(cls, value):
    if isinstance(value, list) and len(value) > MAX_STOP:
      raise ValueError(f'at most {MAX_STOP} stop sequences')
    return value

  def stops(self) -> list[str]:
    if self.stop is None:
      return []
    return [self.stop] if isinstance(self.stop, str) else list(self.stop)

  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.get('include_usage'))


class CompletionRequest(_Request):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = pydantic.Field(16, ge=1)
  echo: bool = False

  @pydantic.field_validator('max_tokens')
  @classmethod
  def _max_tokens(cls, value):
    return 16 if value is None else value  # null: the default, as OpenAI


class ChatRequest(_Request):
  messages: list[Any]
  max_completion_tokens: int | None = pydantic.Field(None, ge=1)


# -------------------------------------------------------------------- the server


class Server:
  """The model, its tokenizer and the engine; builds one response per request."""

  def __init__(self, engine: engine.Engine, tokenizer, model_name: str,
               max_queue: int = 1024, request_timeout: float = 600):
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.context = engine.context
    self.max_queue = max_queue
    self.request_timeout = request_timeout  # seconds; 0: no limit
    self.created = int(time.time())
    self.chat = chat_template.has_chat_tokens(tokenizer)
    self.vocab_size = engine.cfg.vocab_size

  # ------------------------------------------------ checks

  def check_model(self, name: str) -> None:
    if name != self.model_name:
      raise APIError(404, f"The model '{name}' does not exist; this server serves "
                     f"'{self.model_name}' (GET /v1/models).", 'model', 'model_not_found')

  def check_length(self, prompt: list[int], max_tokens: int, param: str,
                   prompt_param: str) -> None:
    if len(prompt) + max_tokens > self.context:
      raise APIError(400, f"This model's maximum context length is {self.context} tokens. "
                     f'However, you requested {len(prompt) + max_tokens} tokens '
                     f'({len(prompt)} in the {prompt_param}, {max_tokens} for the completion). '
                     f'Please reduce the {prompt_param} or {param}.',
                     prompt_param if len(prompt) >= self.context else param,
                     'context_length_exceeded')

  def check_capacity(self, choices: int) -> None:
    """At most max_queue choices wait for a slot, counting the new ones beyond the free slots."""
    if choices > self.engine.slots + self.max_queue:
      raise APIError(400, f'The request asks for {choices} choices (n for each prompt); this '
                     f'server holds at most {self.engine.slots + self.max_queue} '
                     f'({self.engine.slots} slots, a queue of {self.max_queue}).', 'n',
                     'too_many_choices')
    free = self.engine.slots - self.engine.busy_slots
    if self.engine.waiting + choices - free > self.max_queue:
      raise APIError(429, f'The server is busy ({self.engine.waiting} choices waiting for a '
                     'slot); retry later.', None, 'server_busy', 'rate_limit_error',
                     {'Retry-After': '1'})

  def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
      prompts = [self._encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
      prompts = [list(prompt)]
    elif prompt and all(isinstance(p, list) for p in prompt):
      prompts = [list(p) for p in prompt]
    else:
      prompts = [self._encode(p) for p in prompt]
    if not prompts:
      raise APIError(400, "'prompt' must not be an empty list.", 'prompt', 'invalid_value')
    for p in prompts:
      if not p:
        raise APIError(400, "A token list in 'prompt' needs at least one token.", 'prompt', 'invalid_value')
      bad = [t for t in p if not 0 <= t < self.vocab_size]
      if bad:
        raise APIError(400, f"Token id {bad[0]} in 'prompt' is outside the vocabulary [0, "
                       f'{self.vocab_size}).', 'prompt', 'invalid_value')
    return prompts

  def _encode(self, text: str) -> list[int]:
    try:
      return decode.encode_prompt(self.tokenizer, text)
    except UnicodeEncodeError as e:  # JSON can carry lone surrogates ("\ud800"), UTF-8 cannot
      raise APIError(400, f"'prompt' is not valid Unicode text ({e.reason} at character "
                     f'{e.start}).', 'prompt', 'invalid_value') from None

  def chat_prompt(self, req: ChatRequest) -> list[int]:
    if not self.chat:
      raise APIError(400, f"The model '{self.model_name}' has no chat template: its tokenizer "
                     'lacks the chat tokens (fine-tune it for chat with gpt_jax.finetune), so '
                     'use /v1/completions.', 'messages', 'chat_template_missing')
    try:
      messages = chat_template.check_messages(req.messages)
      return chat_template.render(self.tokenizer, messages, add_generation_prompt=True).tokens
    except chat_template.ConversationError as e:
      raise APIError(400, f"Invalid 'messages': {e}.", 'messages', 'invalid_value') from None
    except UnicodeEncodeError as e:
      raise APIError(400, f"Invalid 'messages': not valid Unicode text ({e.reason}).",
                     'messages', 'invalid_value') from None

  # ------------------------------------------------ generation

  def start(self, prompts: list[list[int]], max_tokens: list[int], req: _Request,
            end_ids: frozenset) -> tuple[asyncio.Queue, list[engine.Sequence]]:
    """Submits n choices per prompt; events (choice, kind, value) arrive on the queue:
    ('text', piece), then ('finish', (finish_reason, completion tokens)) or ('error', message)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seed = req.seed if req.seed is not None else secrets.randbits(31)

    def put(event):
      try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
      except RuntimeError:  # the event loop is gone (shutdown)
        pass

    seqs = []
    for i, prompt in enumerate(prompts):
      for j in range(req.n):
        choice = i * req.n + j
        text = decode.RowText(self.tokenizer, req.stops())
        seqs.append(engine.Sequence(
            prompt, max_tokens[i], self._on_token(choice, text, end_ids, put),
            self._on_finish(choice, text, put), end_ids=end_ids, temperature=req.temperature,
            top_p=req.top_p, seed=seed, row=j))
    for seq in seqs:
      self.engine.submit(seq)
    return queue, seqs

  @staticmethod
  def _on_token(choice, text, end_ids, put):
    def on_token(token: int) -> bool:
      piece = text.finish() if token in end_ids else text.add(token)
      if piece:
        put((choice, 'text', piece))
      return text.done
    return on_token

  @staticmethod
  def _on_finish(choice, text, put):
    def on_finish(reason: str, error: str | None) -> None:
      if reason == 'error':
        put((choice, 'error', error))
        return
      stopped = text.done
      piece = text.finish()
      if piece:
        put((choice, 'text', piece))
      put((choice, 'finish', 'stop' if stopped or reason == 'stop' else reason))
    return on_finish


class Guard:
  """ASGI middleware before every endpoint: with an API key, every request but /health carries
  `Authorization: Bearer <key>` (compared in constant time), else 401; a body over
  MAX_BODY_BYTES gets 413 before it is read whole. Both in the OpenAI error shape."""

  def __init__(self, app, api_key: str | None):
    self.app, self.api_key = app, api_key.encode() if api_key else None

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    headers = dict(scope['headers'])
    if self.api_key and scope['path'] != '/health' and not self._authorized(headers):
      await _error_response(scope, receive, send, 401, 'Incorrect or missing API key: send it '
                            'as `Authorization: Bearer <key>`.', 'invalid_api_key',
                            {'WWW-Authenticate': 'Bearer'})
      return
    length = headers.get(b'content-length', b'0')
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
      await _error_response(scope, receive, send, 413, f'The request body exceeds '
                            f'{MAX_BODY_BYTES} bytes.', 'request_too_large')
      return
    received = 0

    async def receive_at_most():  # a body sent without Content-Length (chunked)
      nonlocal received
      message = await receive()
      received += len(message.get('body', b''))
      if received > MAX_BODY_BYTES:
        raise starlette_exceptions.HTTPException(413)  # answered by create_app's handler
      return message
    await self.app(scope, receive_at_most, send)

  def _authorized(self, headers) -> bool:
    scheme, _, key = headers.get(b'authorization', b'').partition(b' ')
    return scheme.lower() == b'bearer' and hmac.compare_digest(key.strip(), self.api_key)


async def _error_response(scope, receive, send, status, message, code, headers=None):
  await responses.JSONResponse(error_body(message, 'invalid_request_error', None, code),
                               status_code=status, headers=headers)(scope, receive, send)


def _usage(prompts, seqs) -> dict:
  prompt_tokens = sum(len(p) for p in prompts)  # each prompt counted once, whatever n
  completion = sum(s.generated for s in seqs)
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion,
          'total_tokens': prompt_tokens + completion}


def create_app(server: Server, api_key: str | None = None) -> fastapi.FastAPI:
  """The FastAPI app; with `api_key`, every endpoint but /health requires it."""
  api = fastapi.FastAPI(title='gpt_jax', docs_url=None, redoc_url=None)
  api.add_middleware(Guard, api_key=api_key)

  @api.exception_handler(APIError)
  async def _api_error(_, exc: APIError):
    return responses.JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code),
                                  status_code=exc.status, headers=exc.headers)

  @api.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _invalid(_, exc):
    e = _validation_error(exc)
    return responses.JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=400)

  @api.exception_handler(starlette_exceptions.HTTPException)
  async def _http(request: fastapi.Request, exc):
    message = {404: f'Unknown URL {request.method} {request.url.path}.',
               405: f'Method {request.method} is not allowed for {request.url.path}.',
               413: f'The request body exceeds {MAX_BODY_BYTES} bytes.'}
    return responses.JSONResponse(
        error_body(message.get(exc.status_code, str(exc.detail)), 'invalid_request_error', None,
                   {404: 'unknown_url', 405: 'method_not_allowed',
                    413: 'request_too_large'}.get(exc.status_code)),
        status_code=exc.status_code)

  @api.get('/health')
  async def health():
    return {'status': 'ok', 'model': server.model_name, 'slots': server.engine.slots,
            'busy_slots': server.engine.busy_slots, 'waiting': server.engine.waiting,
            'steps': server.engine.steps}

  @api.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [_model_card(server)]}

  @api.get('/v1/models/{name}')
  async def model(name: str):
    server.check_model(name)
    return _model_card(server)

  @api.post('/v1/completions')
  async def completions(req: CompletionRequest):
    server.check_model(req.model)
    prompts = server.completion_prompts(req)
    for p in prompts:
      server.check_length(p, req.max_tokens, 'max_tokens', 'prompt')
    server.check_capacity(len(prompts) * req.n)
    queue, seqs = server.start(prompts, [req.max_tokens] * len(prompts), req,
                               _end_ids(server.tokenizer, chat=False))
    return await _respond('text_completion', 'cmpl', prompts, queue, seqs, req, server)

  @api.post('/v1/chat/completions')
  async def chat_completions(req: ChatRequest):
    server.check_model(req.model)
    prompt = server.chat_prompt(req)
    requested = req.max_completion_tokens or req.max_tokens
    param = 'max_completion_tokens' if req.max_completion_tokens else 'max_tokens'
    max_tokens = requested or max(1, server.context - len(prompt))
    server.check_length(prompt, max_tokens, param, 'messages')
    server.check_capacity(req.n)
    queue, seqs = server.start([prompt], [max_tokens], req, _end_ids(server.tokenizer, chat=True))
    return await _respond('chat.completion', 'chatcmpl', [prompt], queue, seqs, req, server)

  return api


def _model_card(server: Server) -> dict:
  return {'id': server.model_name, 'object': 'model', 'created': server.created,
          'owned_by': 'gpt_jax', 'context_length': server.context}


def _end_ids(tokenizer, chat: bool) -> frozenset:
  """End-of-text; for chat also every template marker (as gpt_jax.chat: the end of the turn, or
  the model starting someone else's turn)."""
  if chat:
    return frozenset(chat_template.stop_ids(tokenizer))
  return frozenset({tokenizer.eos_id} - {None})


async def _respond(kind, id_prefix, prompts, queue, seqs, req, server):
  """The whole response, or a Server-Sent Events stream of chunks."""
  meta = {'id': f'{id_prefix}-{uuid.uuid4().hex}', 'created': int(time.time()),
          'model': server.model_name}
  chat = kind == 'chat.completion'
  next_event = _event_reader(queue, seqs, server.request_timeout)
  if req.stream:
    return responses.StreamingResponse(_events(kind, meta, prompts, next_event, seqs, req, chat),
                                       media_type='text/event-stream',
                                       headers={'Cache-Control': 'no-cache'})
  texts, reasons = [''] * len(seqs), [None] * len(seqs)
  try:
    remaining = len(seqs)
    while remaining:
      choice, event, value = await next_event()
      if event == 'text':
        texts[choice] += value
      elif event == 'finish':
        reasons[choice] = value
        remaining -= 1
      else:
        raise APIError(500, f'Generation failed: {value}', None, 'generation_failed',
                       'server_error')
  finally:
    for seq in seqs:  # a no-op for finished ones; frees the slots of an abandoned request
      seq.cancel()
  if chat:
    choices = [{'index': i, 'message': {'role': 'assistant', 'content': t},
                'logprobs': None, 'finish_reason': r} for i, (t, r) in enumerate(zip(texts, reasons))]
  else:
    if req.echo:
      texts = [server.tokenizer.decode(prompts[i // req.n]) + t for i, t in enumerate(texts)]
    choices = [{'index': i, 'text': t, 'logprobs': None, 'finish_reason': r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
  return {**meta, 'object': kind, 'choices': choices, 'usage': _usage(prompts, seqs),
          'system_fingerprint': None}


def _event_reader(queue: asyncio.Queue, seqs, timeout: float):
  """`await next_event()`: the request's next event, or APIError 408 once it has waited and run
  `timeout` seconds in all (0: no limit)."""
  deadline = time.monotonic() + timeout if timeout else None

  async def next_event():
    if deadline is None:
      return await queue.get()
    try:
      return await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
      generated = sum(seq.generated for seq in seqs)
      where = 'while waiting for a slot' if not generated else f'after {generated} tokens'
      raise APIError(408, f'The request did not finish within the server\'s --request_timeout '
                     f'of {timeout:g} s ({where}); it was ended and its slots freed.', None,
                     'request_timeout', 'timeout_error') from None
  return next_event


async def _events(kind, meta, prompts, next_event, seqs, req, chat):
  chunk_kind = 'chat.completion.chunk' if chat else 'text_completion'

  def chunk(choices, **extra):
    return f'data: {json.dumps({**meta, "object": chunk_kind, "choices": choices, **extra})}\n\n'

  try:
    if chat:
      yield chunk([{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                    'logprobs': None, 'finish_reason': None} for i in range(len(seqs))])
    remaining = len(seqs)
    while remaining:
      try:
        choice, event, value = await next_event()
      except APIError as e:  # the response has begun: the error is the stream's last event
        yield f'data: {json.dumps(error_body(e.message, e.kind, e.param, e.code))}\n\n'
        break
      if event == 'text':
        delta = {'content': value} if chat else None
        yield chunk([{'index': choice, 'delta': delta, 'logprobs': None, 'finish_reason': None}
                     if chat else {'index': choice, 'text': value, 'logprobs': None,
                                   'finish_reason': None}])
      elif event == 'finish':
        remaining -= 1
        yield chunk([{'index': choice, 'delta': {}, 'logprobs': None, 'finish_reason': value}
                     if chat else {'index': choice, 'text': '', 'logprobs': None,
                                   'finish_reason': value}])
      else:
        yield f'data: {json.dumps(error_body(f"Generation failed: {value}", "server_error"))}\n\n'
        break
    if req.include_usage():
      yield chunk([], usage=_usage(prompts, seqs))
    yield 'data: [DONE]\n\n'
  finally:  # also when the client disconnects: the engine frees the slots at its next step
    for seq in seqs:
      seq.cancel()


def load(workdir: str, quantize_mode: str = 'none', slots: int = 16, step: int | None = None,
         model_name: str = '', max_queue: int = 1024, request_timeout: float = 600,
         mesh: str = '') -> Server:
  """A Server for a workdir, its programs compiled; mesh: as --mesh."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'Workdir {workdir} does not exist')
  if slots < 1:
    raise ConfigError(f'--slots must be >= 1, got {slots}')
  if max_queue < 0:
    raise ConfigError(f'--max_queue must be >= 0, got {max_queue}')
  if request_timeout < 0:
    raise ConfigError(f'--request_timeout must be >= 0 (0: no limit), got {request_timeout}')
  config = checkpoint.load_config(workdir)
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  placement = sharding.inference_placement(mesh, config.mesh)
  cfg, params, _ = checkpoint.load_model(workdir, step, placement)
  params = quantize.apply(params, quantize_mode)
  batcher = engine.Engine(cfg, params, slots=slots, num_tokens=tokenizer.vocab_size,
                           placement=placement)
  batcher.compile()
  name = model_name or os.path.basename(os.path.normpath(workdir))
  return Server(batcher.start(), tokenizer, name, max_queue, request_timeout)
