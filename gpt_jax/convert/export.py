"""A workdir's model for runtimes without gpt_jax: StableHLO (any XLA runtime) or ONNX
(`python -m gpt_jax.export` writes them).

The parameters of the latest (or --step) checkpoint are constants of the exported programs; the
shapes are fixed (--batch rows of --max_len tokens, padded at the end: attention is causal, so
padding changes no earlier token's logits).

  forward(tokens int32[B, L]) -> logits float32[B, L, V]
  with --decode, decoding with the KV cache as an input and an output:
  prefill(tokens int32[B, L], lengths int32[B]) -> (logits float32[B, V] of each row's last
      token, cache)
  decode_step(tokens int32[B], positions int32[B], cache) -> (logits float32[B, V], cache)
  where cache is num_layers x (k, v), each float32[B, kv_heads, max_len, head_dim] (the model's
  compute dtype), and position p is the slot the token is written to (the prompt's length for
  the first step).

`stablehlo`: each function as `<name>.jax_exported` (jax.export's serialization: reload it with
`jax.export.deserialize(bytes).call(...)`, no gpt_jax needed) and `<name>.mlir` (the StableHLO
module as text, for other XLA runtimes). `onnx`: `<name>.onnx`, through the Hugging Face GPT-2
form of the model (gpt_jax/convert/gpt2.py; prefill and decode_step: onnx_decode.py over its
layers) and torch.onnx, checked with onnx.checker; token ids, lengths and positions are int64;
only float32 models in the GPT-2 layout (with biases or without: zero ones) export. Either way
`manifest.json` lists each function's inputs and outputs (names, shapes, dtypes, in the flat
order of the arguments; ONNX names the updated cache `new_cache_<layer>_<k|v>`) and the
tokenizer's files are copied to `tokenizer/`. The vocabulary may have padding rows: only logits
below manifest['num_tokens'] are tokens.
"""

import dataclasses
import json
import os
import shutil

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import checkpoint
from gpt_jax.convert import gpt2
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, init_cache

FORMATS = ('stablehlo', 'onnx')


def export_config(cfg: ModelConfig) -> ModelConfig:
  """The model as exported: plain XLA attention (no platform kernel), no dropout, no remat."""
  return dataclasses.replace(cfg, attention='xla', dropout=0.0, remat='none')


def functions(cfg: ModelConfig, params, batch: int, max_len: int, decode: bool) -> dict:
  """{name: (function, example arguments as ShapeDtypeStructs, input names, output names)}."""
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
  rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch))
  cache_names = [f'cache_{i}_{kv}' for i in range(cfg.num_layers) for kv in ('k', 'v')]

  def forward(tokens):
    return model.apply({'params': params}, tokens)[0]

  def prefill(tokens, lengths):
    logits, new_cache = model.apply({'params': params}, tokens, cache=init_cache(cfg, batch),
                                    logits_at=(lengths - 1)[:, None])
    return logits[:, 0], new_cache

  def decode_step(tokens, positions, cache):
    logits, new_cache = model.apply({'params': params}, tokens[:, None],
                                    positions=positions[:, None], cache=cache)
    return logits[:, 0], new_cache

  out = {'forward': (forward, (tokens,), ['tokens'], ['logits'])}
  if decode:
    out['prefill'] = (prefill, (tokens, rows), ['tokens', 'lengths'], ['logits'] + cache_names)
    out['decode_step'] = (decode_step, (rows, rows, cache), ['tokens', 'positions'] + cache_names,
                          ['logits'] + cache_names)
  return out


def _describe(names, structs) -> list[dict]:
  leaves = jax.tree.leaves(structs)
  if len(names) != len(leaves):
    raise AssertionError(f'{len(names)} names for {len(leaves)} arrays')
  return [{'name': n, 'shape': list(x.shape), 'dtype': str(x.dtype)} for n, x in zip(names, leaves)]


def export_stablehlo(cfg: ModelConfig, params, out: str, batch: int, max_len: int,
                     decode: bool) -> dict:
  """Writes <name>.jax_exported and <name>.mlir per function; returns their manifest entries."""
  entries = {}
  for name, (fn, args, inputs, outputs) in functions(cfg, params, batch, max_len,
                                                     decode).items():
    exported = jax.export.export(jax.jit(fn))(*args)
    with open(os.path.join(out, f'{name}.jax_exported'), 'wb') as f:
      f.write(exported.serialize())
    with open(os.path.join(out, f'{name}.mlir'), 'w') as f:
      f.write(exported.mlir_module())
    entries[name] = {'files': [f'{name}.jax_exported', f'{name}.mlir'],
                     'inputs': _describe(inputs, exported.in_avals),
                     'outputs': _describe(outputs, exported.out_avals),
                     'platforms': list(exported.platforms)}
  return entries


def with_zero_biases(cfg: ModelConfig, params) -> dict:
  """`params` of a model without biases, with the zero biases of the same model with them."""
  with_biases = nn.unbox(jax.eval_shape(lambda: Transformer(dataclasses.replace(
      cfg, use_bias=True)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))['params']
  given = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      path: given[path] if path in given else np.zeros(leaf.shape, leaf.dtype)
      for path, leaf in traverse_util.flatten_dict(with_biases).items()})


def check_onnx_exportable(cfg: ModelConfig, model_fields: dict) -> None:
  """A ConfigError naming what the ONNX export cannot express."""
  gpt2.check_gpt2_layout(dict(model_fields, use_bias=True))  # no biases: zero ones
  for field in ('compute_dtype', 'param_dtype', 'residual_dtype'):
    if getattr(cfg, field) != 'float32':
      raise ConfigError(f'model.{field}={getattr(cfg, field)!r}: the ONNX export is float32')


def hf_gpt2(cfg: ModelConfig, params, model_fields: dict):
  """The model as a transformers GPT2LMHeadModel (eval mode, float32, no cache of its own)."""
  # Imported here: torch and transformers are the `export` extra, needed for ONNX only.
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  if not cfg.use_bias:  # GPT-2 has biases: zero ones add nothing
    model_fields = dict(model_fields, use_bias=True)
    params = with_zero_biases(cfg, params)
  hf_config = transformers.GPT2Config(**{
      k: v for k, v in gpt2.hf_config_from_model(model_fields, None).items()
      if k not in ('architectures', 'model_type')})
  hf_config.use_cache = False
  hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in gpt2.params_to_hf(
      jax.device_get(params), model_fields).items()}
  hf_model.transformer.load_state_dict({k.removeprefix('transformer.'): v
                                        for k, v in tensors.items()
                                        if not k.startswith('lm_head')}, strict=False)
  if not cfg.tie_embeddings:
    hf_model.lm_head.weight.data.copy_(tensors['lm_head.weight'])
  return hf_model


def _onnx_function(module, example: tuple, out: str, name: str, inputs: list[dict],
                   outputs: list[dict]) -> dict:
  """Writes <name>.onnx (torch.onnx, checked with onnx.checker); returns its manifest entry."""
  import onnx  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  path = os.path.join(out, f'{name}.onnx')
  with torch.no_grad():
    torch.onnx.export(module.eval(), example, path, input_names=[i['name'] for i in inputs],
                      output_names=[o['name'] for o in outputs], dynamo=True, verbose=False)
  onnx.checker.check_model(path, full_check=True)
  files = [f for f in (f'{name}.onnx', f'{name}.onnx.data')
           if os.path.exists(os.path.join(out, f))]
  return {'files': files, 'inputs': inputs, 'outputs': outputs}


def export_onnx(cfg: ModelConfig, params, model_fields: dict, out: str, batch: int,
                max_len: int, decode: bool) -> dict:
  """Writes forward.onnx (the Hugging Face GPT-2 form through torch.onnx) and, with `decode`,
  prefill.onnx and decode_step.onnx (gpt_jax.convert.onnx_decode); returns their manifest entries."""
  import torch  # pylint: disable=import-outside-toplevel
  from gpt_jax.convert import onnx_decode  # pylint: disable=import-outside-toplevel

  hf_model = hf_gpt2(cfg, params, model_fields)

  class Logits(torch.nn.Module):
    def __init__(self, model):
      super().__init__()
      self.model = model

    def forward(self, tokens):
      return self.model(input_ids=tokens).logits

  def spec(name, shape, dtype):
    return {'name': name, 'shape': list(shape), 'dtype': dtype}

  tokens = torch.zeros((batch, max_len), dtype=torch.int64)
  entries = {'forward': _onnx_function(
      Logits(hf_model), (tokens,), out, 'forward', [spec('tokens', tokens.shape, 'int64')],
      [spec('logits', [batch, max_len, cfg.vocab_size], 'float32')])}
  if decode:
    rows = torch.ones((batch,), dtype=torch.int64)
    cache_shape = (batch, cfg.num_heads, cfg.max_len, cfg.head_dim)
    cache = [spec(f'cache_{i}_{kv}', cache_shape, 'float32')
             for i in range(cfg.num_layers) for kv in ('k', 'v')]
    # ONNX names each value once: the updated cache is new_cache_<layer>_<k|v>.
    new_cache = [dict(c, name=f"new_{c['name']}") for c in cache]
    logits = spec('logits', [batch, cfg.vocab_size], 'float32')
    entries['prefill'] = _onnx_function(
        onnx_decode.Prefill(hf_model, cfg.max_len), (tokens, rows), out, 'prefill',
        [spec('tokens', tokens.shape, 'int64'), spec('lengths', rows.shape, 'int64')],
        [logits] + new_cache)
    # Distinct example tensors: torch.export made one tensor passed twice a single input.
    zeros = tuple(torch.zeros(cache_shape) for _ in cache)
    entries['decode_step'] = _onnx_function(
        onnx_decode.DecodeStep(hf_model, cfg.max_len), (rows, rows.clone()) + zeros, out,
        'decode_step', [spec('tokens', rows.shape, 'int64'),
                        spec('positions', rows.shape, 'int64')] + cache, [logits] + new_cache)
  return entries


def export(workdir: str, fmt: str, out: str, batch: int = 1, max_len: int = 0,
           decode: bool = False, step: int | None = None) -> dict:
  """Writes `out` (the functions, manifest.json, tokenizer/); returns the manifest."""
  if fmt not in FORMATS:
    raise ConfigError(f'--format must be one of {FORMATS}, got {fmt!r}')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir} is not a directory')
  model_fields = dict(checkpoint.load_config(workdir).model)
  cfg = ModelConfig.from_config(model_fields)
  max_len = max_len or cfg.max_len
  if not 0 < max_len <= cfg.max_len:
    raise ConfigError(f'--max_len must be in [1, {cfg.max_len}] (the model\'s context), got '
                      f'{max_len}')
  if batch <= 0:
    raise ConfigError(f'--batch must be positive, got {batch}')
  if fmt == 'onnx':
    check_onnx_exportable(cfg, model_fields)
  cfg, params, step = checkpoint.load_model(workdir, step)  # per layer; LoRA merged
  cfg = export_config(cfg)
  os.makedirs(out, exist_ok=True)
  if fmt == 'stablehlo':
    entries = export_stablehlo(cfg, params, out, batch, max_len, decode)
  else:
    entries = export_onnx(cfg, params, model_fields, out, batch, max_len, decode)
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  manifest = {'format': fmt, 'workdir': os.path.abspath(workdir), 'step': int(step),
              'batch': batch, 'max_len': max_len, 'vocab_size': cfg.vocab_size,
              'num_tokens': cfg.vocab_size, 'eos_id': None, 'tokenizer': None,
              'model': model_fields, 'functions': entries}
  if os.path.isdir(tokenizer_dir):
    tokenizer = tokenizer_lib.load(tokenizer_dir)
    shutil.copytree(tokenizer_dir, os.path.join(out, 'tokenizer'), dirs_exist_ok=True)
    manifest.update(tokenizer='tokenizer', num_tokens=tokenizer.vocab_size,
                    eos_id=tokenizer.eos_id)
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest
