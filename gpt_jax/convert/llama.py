"""Exchange weights with Hugging Face's Llama family (Llama, Mistral, Qwen2), both ways, exactly.

The mapping, per layer i (HF keys under `model.`; torch's Linear stores weights [out, in]):

  layers.i.input_layernorm.weight           block_i/ln_1/scale
  layers.i.self_attn.q_proj.weight          block_i/attn/query/kernel: transposed, [emb, heads,
                                            head_dim] (k_proj, v_proj: key, value with kv_heads)
  layers.i.self_attn.{q,k,v}_proj.bias      block_i/attn/{query,key,value}/bias (Qwen2)
  layers.i.self_attn.o_proj.weight          block_i/attn/out/kernel: [heads, head_dim, emb]
  layers.i.post_attention_layernorm.weight  block_i/ln_2/scale
  layers.i.mlp.gate_proj.weight             block_i/mlp/fc_gate/kernel (transposed)
  layers.i.mlp.up_proj.weight               block_i/mlp/fc_in/kernel (transposed)
  layers.i.mlp.down_proj.weight             block_i/mlp/fc_out/kernel (transposed)
  embed_tokens.weight, norm.weight          wte/embedding, ln_f/scale
  lm_head.weight (untied only)              lm_head/kernel (transposed)

Each HF tensor makes exactly one parameter (`tensor_to_params`), so a checkpoint converts one
tensor at a time. Both directions are transposes and reshapes: a round trip is bit-identical.
HF's q/k rows are in the rotate-half order gpt_jax's RoPE uses (transformers' own layout), so
no permutation is needed.
"""

import re

import numpy as np

from gpt_jax.errors import ConfigError

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM'}
# Buffers that some checkpoints saved with the weights (RoPE's frequencies: recomputed here).
BUFFER_SUFFIXES = ('.rotary_emb.inv_freq',)

_LAYER = re.compile(r'model\.layers\.(\d+)\.(.+)')
# HF name inside a layer -> (gpt_jax path inside block_i, kind of transform).
_LAYER_WEIGHTS = {
    'input_layernorm.weight': (('ln_1', 'scale'), 'copy'),
    'self_attn.q_proj.weight': (('attn', 'query', 'kernel'), 'qkv'),
    'self_attn.k_proj.weight': (('attn', 'key', 'kernel'), 'qkv'),
    'self_attn.v_proj.weight': (('attn', 'value', 'kernel'), 'qkv'),
    'self_attn.q_proj.bias': (('attn', 'query', 'bias'), 'qkv_bias'),
    'self_attn.k_proj.bias': (('attn', 'key', 'bias'), 'qkv_bias'),
    'self_attn.v_proj.bias': (('attn', 'value', 'bias'), 'qkv_bias'),
    'self_attn.o_proj.weight': (('attn', 'out', 'kernel'), 'out'),
    'post_attention_layernorm.weight': (('ln_2', 'scale'), 'copy'),
    'mlp.gate_proj.weight': (('mlp', 'fc_gate', 'kernel'), 'transpose'),
    'mlp.up_proj.weight': (('mlp', 'fc_in', 'kernel'), 'transpose'),
    'mlp.down_proj.weight': (('mlp', 'fc_out', 'kernel'), 'transpose'),
}
_TOP_WEIGHTS = {
    'model.embed_tokens.weight': (('wte', 'embedding'), 'copy'),
    'model.norm.weight': (('ln_f', 'scale'), 'copy'),
    'lm_head.weight': (('lm_head', 'kernel'), 'transpose'),
}


def is_llama_family(hf: dict) -> bool:
  return hf.get('model_type') in ARCHITECTURES


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling parameters) from transformers 5's `rope_parameters` or 4's
  `rope_theta` + `rope_scaling`."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = params.get('rope_theta', hf.get('rope_theta', 10_000.0))
  return theta, params


def model_fields_from_hf(hf: dict) -> dict:
  """config.model fields for a Llama / Mistral / Qwen2 config.json, or a ConfigError naming the
  first entry that gpt_jax does not implement."""
  model_type = hf['model_type']
  missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                         'num_attention_heads') if k not in hf]
  if missing:
    raise ConfigError(f'config.json of a {model_type} model lacks {", ".join(missing)}')
  emb, heads = hf['hidden_size'], hf['num_attention_heads']
  kv_heads = hf.get('num_key_value_heads') or heads
  max_len = hf.get('max_position_embeddings', 2048)

  def refuse(entry: str, why: str):
    raise ConfigError(f'config.json sets {entry}, which gpt_jax does not implement ({why})')

  if hf.get('hidden_act', 'silu') != 'silu':
    refuse(f'hidden_act={hf["hidden_act"]!r}', 'the MLP is SwiGLU with silu')
  if emb % heads:
    raise ConfigError(f'config.json: hidden_size ({emb}) is not divisible by num_attention_heads '
                      f'({heads})')
  if hf.get('head_dim') not in (None, emb // heads):
    refuse(f'head_dim={hf["head_dim"]}', f'heads are hidden_size / num_attention_heads = '
           f'{emb // heads} wide')
  for entry in ('attention_bias', 'mlp_bias'):
    if hf.get(entry):
      refuse(f'{entry}=true', 'Llama-layout projections have no biases')
  window = hf.get('sliding_window')
  uses_window = hf.get('use_sliding_window', True)  # Mistral's: whenever sliding_window is set
  if ((window is not None and uses_window and window < max_len)
      or any(t != 'full_attention' for t in hf.get('layer_types') or ())):
    refuse(f'sliding_window={window}', 'attention is over the whole context')
  theta, rope = _rope(hf)
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  fields = dict(rope_scaling='none')
  if rope_type == 'llama3':
    fields = dict(rope_scaling='llama3', rope_scaling_factor=float(rope['factor']),
                  rope_low_freq_factor=float(rope['low_freq_factor']),
                  rope_high_freq_factor=float(rope['high_freq_factor']),
                  rope_original_max_len=int(rope['original_max_position_embeddings']))
  elif rope_type != 'default':
    refuse(f'rope_type={rope_type!r}', "RoPE is plain or Llama 3's ('llama3')")
  return dict(
      vocab_size=hf['vocab_size'], max_len=max_len, num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=0 if kv_heads == heads else kv_heads, emb_dim=emb,
      mlp_dim=hf['intermediate_size'], position='rope', rope_theta=float(theta), **fields,
      norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), mlp='swiglu', use_bias=False,
      qkv_bias=model_type == 'qwen2', qk_norm=False,
      tie_embeddings=hf.get('tie_word_embeddings', model_type == 'qwen2'),
      dropout=0.0,  # HF's are for training; set config.model.dropout when fine-tuning
      param_dtype='float32')


def hf_shapes(model: dict) -> dict[str, tuple[int, ...]]:
  """The shape of every HF weight for config.model fields."""
  e, m, v = model['emb_dim'], model['mlp_dim'], model['vocab_size']
  heads = model['num_heads']
  d = e // heads
  kv = (model['num_kv_heads'] or heads) * d
  shapes = {'model.embed_tokens.weight': (v, e), 'model.norm.weight': (e,)}
  for i in range(model['num_layers']):
    p = f'model.layers.{i}'
    shapes.update({
        f'{p}.input_layernorm.weight': (e,), f'{p}.post_attention_layernorm.weight': (e,),
        f'{p}.self_attn.q_proj.weight': (e, e), f'{p}.self_attn.k_proj.weight': (kv, e),
        f'{p}.self_attn.v_proj.weight': (kv, e), f'{p}.self_attn.o_proj.weight': (e, e),
        f'{p}.mlp.gate_proj.weight': (m, e), f'{p}.mlp.up_proj.weight': (m, e),
        f'{p}.mlp.down_proj.weight': (e, m)})
    if model.get('qkv_bias'):
      shapes.update({f'{p}.self_attn.q_proj.bias': (e,), f'{p}.self_attn.k_proj.bias': (kv,),
                     f'{p}.self_attn.v_proj.bias': (kv,)})
  if not model['tie_embeddings']:
    shapes['lm_head.weight'] = (v, e)
  return shapes


def tensor_to_params(name: str, x, model: dict) -> list[tuple[tuple[str, ...], object]]:
  """[(gpt_jax parameter path, value)] of the HF tensor `name` (numpy, or a
  jax.ShapeDtypeStruct under jax.eval_shape): always one."""
  match = _LAYER.fullmatch(name)
  if match:
    path, kind = _LAYER_WEIGHTS[match.group(2)]
    path = (f'block_{match.group(1)}',) + path
  else:
    path, kind = _TOP_WEIGHTS[name]
  d = model['emb_dim'] // model['num_heads']
  if kind == 'qkv':  # [heads * d, emb] -> [emb, heads, d]
    x = x.T.reshape(x.shape[1], x.shape[0] // d, d)
  elif kind == 'qkv_bias':
    x = x.reshape(-1, d)
  elif kind == 'out':  # [emb, heads * d] -> [heads, d, emb]
    x = x.T.reshape(x.shape[1] // d, d, x.shape[0])
  elif kind == 'transpose':
    x = x.T
  return [(path, x)]


def params_to_hf(params: dict, model: dict) -> dict:
  """HF tensors (full names) from per-layer gpt_jax params: float32, contiguous."""
  p = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {'model.embed_tokens.weight': p(params['wte']['embedding']),
         'model.norm.weight': p(params['ln_f']['scale'])}
  for i in range(model['num_layers']):
    block, prefix = params[f'block_{i}'], f'model.layers.{i}'
    for hf_name, (path, kind) in _LAYER_WEIGHTS.items():
      if kind == 'qkv_bias' and not model.get('qkv_bias'):
        continue
      x = block
      for key in path:
        x = x[key]
      x = np.asarray(x)
      if kind in ('qkv', 'out'):  # [emb, heads, d] / [heads, d, emb] -> [out, in]
        x = x.reshape(x.shape[0], -1).T if kind == 'qkv' else x.reshape(-1, x.shape[-1]).T
      elif kind == 'qkv_bias':
        x = x.reshape(-1)
      elif kind == 'transpose':
        x = x.T
      out[f'{prefix}.{hf_name}'] = p(x)
  if not model['tie_embeddings']:
    out['lm_head.weight'] = p(np.asarray(params['lm_head']['kernel']).T)
  return out


def check_layout(model) -> str:
  """The HF model_type that can hold these config.model fields ('qwen2' with q/k/v biases,
  else 'llama'), or a ConfigError naming the first field that has no Llama-family equivalent."""
  expected = dict(position='rope', norm='rmsnorm', mlp='swiglu', use_bias=False, qk_norm=False)
  for field, value in expected.items():
    if model.get(field, value) != value:
      raise ConfigError(f'config.model.{field}={model[field]!r}: a Hugging Face Llama, Mistral '
                        f'or Qwen2 needs {value!r}; this model is in neither the GPT-2 nor the '
                        'Llama layout')
  return 'qwen2' if model.get('qkv_bias') else 'llama'


def hf_config_from_model(model: dict, bos_id: int | None, eos_id: int | None) -> dict:
  """A transformers config.json (Llama, or Qwen2 with q/k/v biases) for config.model fields."""
  model_type = check_layout(model)
  heads = model['num_heads']
  rope = {'rope_type': 'default', 'rope_theta': model['rope_theta']}
  if model.get('rope_scaling', 'none') == 'llama3':
    rope.update(rope_type='llama3', factor=model['rope_scaling_factor'],
                low_freq_factor=model['rope_low_freq_factor'],
                high_freq_factor=model['rope_high_freq_factor'],
                original_max_position_embeddings=model['rope_original_max_len'])
  config = {
      'architectures': [ARCHITECTURES[model_type]], 'model_type': model_type,
      'vocab_size': model['vocab_size'], 'hidden_size': model['emb_dim'],
      'intermediate_size': model['mlp_dim'], 'num_hidden_layers': model['num_layers'],
      'num_attention_heads': heads, 'num_key_value_heads': model['num_kv_heads'] or heads,
      'head_dim': model['emb_dim'] // heads, 'hidden_act': 'silu',
      'max_position_embeddings': model['max_len'], 'rms_norm_eps': model['norm_eps'],
      # Both spellings: transformers 5 reads rope_parameters, 4 rope_theta + rope_scaling.
      'rope_parameters': rope, 'rope_theta': model['rope_theta'],
      'rope_scaling': rope if rope['rope_type'] != 'default' else None,
      'tie_word_embeddings': model['tie_embeddings'], 'attention_dropout': 0.0,
      'initializer_range': 0.02, 'bos_token_id': bos_id, 'eos_token_id': eos_id,
      'use_cache': True, 'dtype': 'float32'}
  if model_type == 'llama':
    config.update(attention_bias=False, mlp_bias=False)
  else:
    config.update(use_sliding_window=False, sliding_window=None)
  return config
