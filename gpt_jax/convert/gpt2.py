"""Hugging Face GPT-2 weights to gpt_jax parameters and back, exactly.

  python -m gpt_jax.convert.from_hf --hf_dir=DIR --workdir=OUT   # HF folder -> gpt_jax workdir
  python -m gpt_jax.convert.to_hf --workdir=DIR --out=HF_DIR     # gpt_jax workdir -> HF folder

The mapping, per block i (HF keys under `transformer.`; GPT-2's Conv1D stores weights [in, out]):

  h.i.ln_1.{weight,bias}        block_i/ln_1/{scale,bias}
  h.i.attn.c_attn.weight        block_i/attn/{query,key,value}/kernel: [emb, 3*emb] split
                                into 3 x [emb, heads, head_dim]
  h.i.attn.c_attn.bias          block_i/attn/{query,key,value}/bias: 3 x [heads, head_dim]
  h.i.attn.c_proj.{weight,bias} block_i/attn/out/{kernel,bias}: [emb, emb] = [heads, head_dim, emb]
  h.i.ln_2.{weight,bias}        block_i/ln_2/{scale,bias}
  h.i.mlp.c_fc.{weight,bias}    block_i/mlp/fc_in/{kernel,bias}: [emb, mlp]
  h.i.mlp.c_proj.{weight,bias}  block_i/mlp/fc_out/{kernel,bias}: [mlp, emb]
  wte.weight, wpe.weight        wte/embedding, wpe
  ln_f.{weight,bias}            ln_f/{scale,bias}
  lm_head.weight (untied only)  lm_head/kernel (transposed)

Both directions are pure reshapes and transposes of float32 arrays, so a round trip is
bit-identical and logits agree with transformers' to float32 rounding.
"""

import numpy as np

from gpt_jax.errors import ConfigError

# Hugging Face activation names that are GPT-2's tanh-approximated GELU (gpt_jax's 'gelu').
TANH_GELU = ('gelu_new', 'gelu_pytorch_tanh')


# Buffers that old transformers versions saved with the weights (the causal mask).
BUFFER_SUFFIXES = ('.attn.bias', '.attn.masked_bias')


def tensor_to_params(name: str, x, model: dict) -> list[tuple[tuple[str, ...], object]]:
  """The (gpt_jax parameter path, value) pairs made from HF GPT-2 tensor `name` (without the
  `transformer.` prefix): one each, but c_attn's, split into query, key and value. Works on
  numpy arrays, or on jax.ShapeDtypeStructs under `jax.eval_shape` (see tests)."""
  e, heads = model['emb_dim'], model['num_heads']
  d = e // heads
  parts = name.split('.')
  if parts[0] != 'h':
    top = {'wte.weight': ('wte', 'embedding'), 'wpe.weight': ('wpe',),
           'ln_f.weight': ('ln_f', 'scale'), 'ln_f.bias': ('ln_f', 'bias'),
           'lm_head.weight': ('lm_head', 'kernel')}
    return [(top[name], x.T if name == 'lm_head.weight' else x)]
  block, rest = f'block_{parts[1]}', '.'.join(parts[2:])
  kind = 'scale' if rest.endswith('weight') else 'bias'
  if rest.startswith(('ln_1.', 'ln_2.')):
    return [((block, parts[2], kind), x)]
  if rest == 'attn.c_attn.weight':
    x = x.reshape(e, 3, heads, d)
    return [((block, 'attn', n, 'kernel'), x[:, j])
            for j, n in enumerate(('query', 'key', 'value'))]
  if rest == 'attn.c_attn.bias':
    x = x.reshape(3, heads, d)
    return [((block, 'attn', n, 'bias'), x[j]) for j, n in enumerate(('query', 'key', 'value'))]
  if rest == 'attn.c_proj.weight':
    return [((block, 'attn', 'out', 'kernel'), x.reshape(heads, d, e))]
  kind = 'kernel' if rest.endswith('weight') else 'bias'
  ours = {'attn.c_proj': ('attn', 'out'), 'mlp.c_fc': ('mlp', 'fc_in'),
          'mlp.c_proj': ('mlp', 'fc_out')}[rest.rsplit('.', 1)[0]]
  return [((block,) + ours + (kind,), x)]


def hf_to_params(tensors: dict, model: dict) -> dict:
  """gpt_jax params from HF GPT-2 tensors (names without the `transformer.` prefix).

  `model` holds the config.model fields. Works on numpy arrays, or on jax.ShapeDtypeStructs
  under `jax.eval_shape` (see tests).
  """
  params = {}
  for name in hf_shapes(model):
    for path, value in tensor_to_params(name, tensors[name], model):
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = value
  return params


def hf_shapes(model: dict) -> dict[str, tuple[int, ...]]:
  """The shape of every HF GPT-2 weight (names without `transformer.`) for config.model fields."""
  e, m, v = model['emb_dim'], model['mlp_dim'], model['vocab_size']
  shapes = {'wte.weight': (v, e), 'wpe.weight': (model['max_len'], e),
            'ln_f.weight': (e,), 'ln_f.bias': (e,)}
  for i in range(model['num_layers']):
    h = f'h.{i}'
    shapes.update({
        f'{h}.ln_1.weight': (e,), f'{h}.ln_1.bias': (e,),
        f'{h}.attn.c_attn.weight': (e, 3 * e), f'{h}.attn.c_attn.bias': (3 * e,),
        f'{h}.attn.c_proj.weight': (e, e), f'{h}.attn.c_proj.bias': (e,),
        f'{h}.ln_2.weight': (e,), f'{h}.ln_2.bias': (e,),
        f'{h}.mlp.c_fc.weight': (e, m), f'{h}.mlp.c_fc.bias': (m,),
        f'{h}.mlp.c_proj.weight': (m, e), f'{h}.mlp.c_proj.bias': (e,)})
  if not model['tie_embeddings']:
    shapes['lm_head.weight'] = (v, e)
  return shapes


def params_to_hf(params: dict, model: dict) -> dict:
  """HF GPT-2 tensors (names with the `transformer.` prefix) from gpt_jax params."""
  e, layers = model['emb_dim'], model['num_layers']
  p = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {'transformer.wte.weight': p(params['wte']['embedding']),
         'transformer.wpe.weight': p(params['wpe']),
         'transformer.ln_f.weight': p(params['ln_f']['scale']),
         'transformer.ln_f.bias': p(params['ln_f']['bias'])}
  for i in range(layers):
    block, h = params[f'block_{i}'], f'transformer.h.{i}'
    attn = block['attn']
    qkv = ('query', 'key', 'value')
    out[f'{h}.attn.c_attn.weight'] = p(np.stack(
        [np.asarray(attn[n]['kernel']).reshape(e, e) for n in qkv], axis=1).reshape(e, 3 * e))
    out[f'{h}.attn.c_attn.bias'] = p(np.concatenate(
        [np.asarray(attn[n]['bias']).reshape(e) for n in qkv]))
    out[f'{h}.attn.c_proj.weight'] = p(np.asarray(attn['out']['kernel']).reshape(e, e))
    out[f'{h}.attn.c_proj.bias'] = p(attn['out']['bias'])
    for ln in ('ln_1', 'ln_2'):
      out[f'{h}.{ln}.weight'] = p(block[ln]['scale'])
      out[f'{h}.{ln}.bias'] = p(block[ln]['bias'])
    for ours, theirs in (('fc_in', 'c_fc'), ('fc_out', 'c_proj')):
      out[f'{h}.mlp.{theirs}.weight'] = p(block['mlp'][ours]['kernel'])
      out[f'{h}.mlp.{theirs}.bias'] = p(block['mlp'][ours]['bias'])
  if not model['tie_embeddings']:
    out['lm_head.weight'] = p(np.asarray(params['lm_head']['kernel']).T)
  return out


def model_fields_from_hf(hf: dict) -> dict:
  """config.model fields for a Hugging Face GPT-2 config.json; ConfigError if not GPT-2."""
  model_type = hf.get('model_type')
  if model_type != 'gpt2':
    raise ConfigError(f"config.json has model_type {model_type!r}; only GPT-2 ('gpt2') "
                      'checkpoints can be converted')
  unsupported = {
      'activation_function': hf.get('activation_function', 'gelu_new') not in TANH_GELU,
      'scale_attn_by_inverse_layer_idx': hf.get('scale_attn_by_inverse_layer_idx', False),
      'scale_attn_weights': not hf.get('scale_attn_weights', True),
      'add_cross_attention': hf.get('add_cross_attention', False),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ConfigError(f'config.json sets {", ".join(f"{k}={hf.get(k)!r}" for k in bad)}, '
                      "which gpt_jax's GPT-2 layout does not implement")
  emb, heads = hf.get('n_embd', 768), hf.get('n_head', 12)
  if emb % heads:
    raise ConfigError(f'config.json: n_embd ({emb}) is not divisible by n_head ({heads})')
  return dict(
      vocab_size=hf.get('vocab_size', 50257),
      max_len=hf.get('n_positions', hf.get('n_ctx', 1024)),
      num_layers=hf.get('n_layer', 12), num_heads=heads, num_kv_heads=0, emb_dim=emb,
      mlp_dim=hf.get('n_inner') or 4 * emb, position='learned', norm='layernorm',
      norm_eps=hf.get('layer_norm_epsilon', 1e-5), mlp='gelu', use_bias=True,
      tie_embeddings=hf.get('tie_word_embeddings', True),
      dropout=0.0,  # HF's are for training; set config.model.dropout when fine-tuning
      param_dtype='float32')


def check_gpt2_layout(model) -> None:
  """ConfigError naming the first config.model field that has no GPT-2 equivalent."""
  expected = dict(position='learned', norm='layernorm', mlp='gelu', use_bias=True,
                  qk_norm=False)
  for field, value in expected.items():
    if model.get(field, value) != value:  # configs saved before a field existed lack it
      raise ConfigError(f'config.model.{field}={model[field]!r}: a Hugging Face GPT-2 needs '
                        f'{value!r}; this model is not in the GPT-2 layout')
  if model['num_kv_heads'] not in (0, model['num_heads']):
    raise ConfigError(f'config.model.num_kv_heads={model["num_kv_heads"]}: GPT-2 has no '
                      'grouped-query attention; this model is not in the GPT-2 layout')
  if model.get('head_dim', 0) not in (0, model['emb_dim'] // model['num_heads']):
    raise ConfigError(f'config.model.head_dim={model["head_dim"]}: GPT-2 needs num_heads x '
                      f'head_dim = emb_dim ({model["emb_dim"]}); this model is not in the GPT-2 '
                      'layout')


def hf_config_from_model(model: dict, eos_id: int | None) -> dict:
  """A transformers GPT2Config (as config.json) for gpt_jax model fields."""
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'vocab_size': model['vocab_size'], 'n_positions': model['max_len'],
      'n_embd': model['emb_dim'], 'n_layer': model['num_layers'], 'n_head': model['num_heads'],
      'n_inner': model['mlp_dim'], 'activation_function': 'gelu_new',
      'layer_norm_epsilon': model['norm_eps'], 'tie_word_embeddings': model['tie_embeddings'],
      'resid_pdrop': model['dropout'], 'embd_pdrop': model['dropout'],
      'attn_pdrop': model['dropout'], 'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
      'initializer_range': 0.02, 'bos_token_id': eos_id, 'eos_token_id': eos_id,
      'use_cache': True, 'dtype': 'float32',
  }
