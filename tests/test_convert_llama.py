"""Hugging Face Llama / Mistral / Qwen2 <-> gpt_jax: exact logits, identical greedy tokens,
bit-identical round trips, one-line refusals of what the model does not implement."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import module_env
import hf_tokenizers
from gpt_jax import checkpoint, decode
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import from_hf, to_hf
from gpt_jax.errors import ConfigError
from gpt_jax.model import Transformer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              # A wide init makes the next-token distribution peaked: greedy choices are not
              # near-ties.
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MODELS = {
    # Grouped-query attention, untied head, Llama 3.1's rope scaling (over a short original
    # context, so that all three frequency bands occur), a sharded checkpoint with its index.
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=None, rope_theta=1e6, tie_word_embeddings=False)),
    # q/k/v biases, tied embeddings.
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


def save_hf_model(directory, name, max_shard_size=None):
  config_cls, model_cls, fields = MODELS[name]
  torch.manual_seed(0)
  model = model_cls(config_cls(**COMMON, **fields)).eval()
  if name == 'qwen2':  # transformers initialises biases at zero: make them matter
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)
  hf_tokenizers.build(directory, {'llama': 'llama3'}.get(name, name),
                      vocab_size=40 if name == 'mistral' else 300)
  return model


@pytest.fixture(scope='module', params=sorted(MODELS))
def pair(request, tmp_path_factory):
  """(name, the transformers model, its converted workdir)."""
  name = request.param
  hf_dir = str(tmp_path_factory.mktemp(f'hf_{name}'))
  model = save_hf_model(hf_dir, name, max_shard_size='20KB' if name == 'llama' else None)
  workdir = str(tmp_path_factory.mktemp(f'converted_{name}'))
  from_hf.convert_checkpoint(hf_dir, workdir)
  return name, hf_dir, model, workdir


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_logits_and_greedy_generation_match_transformers(pair):
  name, hf_dir, hf_model, workdir = pair
  if name == 'llama':
    assert os.path.isfile(os.path.join(hf_dir, 'model.safetensors.index.json'))
  cfg, params, _ = checkpoint.load_model(workdir)
  assert (cfg.num_kv_heads, cfg.position, cfg.norm, cfg.mlp) == (2, 'rope', 'rmsnorm', 'swiglu')
  assert cfg.qkv_bias == (name == 'qwen2') and cfg.tie_embeddings == (name == 'qwen2')
  assert cfg.rope_scaling == ('llama3' if name == 'llama' else 'none')
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 64))
  ours, _ = Transformer(cfg).apply({'params': params}, tokens)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(hf_model, tokens), atol=1e-4, rtol=0)

  if name != 'llama':
    return  # decoding shares its projections with the forward pass: Llama's tests them here
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, VOCAB, n)) for n in (3, 14)]  # one prefill bucket
  generated = decode.Generator(cfg, params).generate(prompts, 20, temperature=0)
  for prompt, tokens in zip(prompts, generated):
    theirs = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
        1, len(prompt), dtype=torch.long), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert tokens == theirs[0, len(prompt):].tolist()


def test_round_trip_is_bit_identical(pair, tmp_path):
  name, _, hf_model, workdir = pair
  out = str(tmp_path / 'hf')
  hf_config, _ = to_hf.export(workdir, out)
  assert hf_config['model_type'] == ('qwen2' if name == 'qwen2' else 'llama')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  text = 'Round trip: café 中文 '
  assert (transformers.AutoTokenizer.from_pretrained(out)(text)['input_ids']
          == tokenizer_lib.load(os.path.join(workdir, 'tokenizer')).encode(text))
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 40))
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))

  again = str(tmp_path / 'again')
  from_hf.convert_checkpoint(out, again)
  _, first, _ = checkpoint.load_model(workdir)
  _, second, _ = checkpoint.load_model(again)
  same = jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                      first, second)
  assert all(jax.tree.leaves(same))
  assert checkpoint.load_config(again).model == checkpoint.load_config(workdir).model


def write_config(directory, **fields):
  os.makedirs(directory, exist_ok=True)
  config = {'model_type': 'llama', 'vocab_size': VOCAB, 'hidden_size': 32,
            'intermediate_size': 64, 'num_hidden_layers': 1, 'num_attention_heads': 4,
            **fields}
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(directory)


@pytest.mark.parametrize('fields, message', [
    (dict(model_type='mistral', sliding_window=16, max_position_embeddings=64),
     'sliding_window=16'),
    (dict(model_type='qwen2', use_sliding_window=True, sliding_window=16,
          max_position_embeddings=64), 'sliding_window=16'),
    (dict(rope_scaling={'rope_type': 'yarn', 'factor': 4.0}), "rope_type='yarn'"),
    (dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4}), "rope_type='dynamic'"),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(attention_bias=True), 'attention_bias=true'),
    (dict(head_dim=16), 'head_dim=16'),
    (dict(model_type='gemma'), "model_type 'gemma'; gpt_jax converts gpt2, llama"),
])
def test_unsupported_entries_are_refused_in_one_line(tmp_path, fields, message):
  hf_dir = write_config(tmp_path / 'hf', **fields)
  with pytest.raises(ConfigError, match=message):
    from_hf.convert_checkpoint(hf_dir, str(tmp_path / 'out'))


def test_checkpoint_errors_name_the_weight(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  save_hf_model(hf_dir, 'mistral')
  config, _, _ = from_hf.convert_checkpoint(hf_dir, str(tmp_path / 'short'), max_len=32)
  assert config.model.max_len == config.data.seq_len == 32
  config = json.load(open(os.path.join(hf_dir, 'config.json')))
  config['intermediate_size'] = 48
  json.dump(config, open(os.path.join(hf_dir, 'config.json'), 'w'))
  with pytest.raises(ConfigError, match=r'Weight model.layers.0.mlp.\w+_proj.weight has shape'):
    from_hf.convert_checkpoint(hf_dir, str(tmp_path / 'out'))
  config['intermediate_size'], config['num_hidden_layers'] = 64, 3
  json.dump(config, open(os.path.join(hf_dir, 'config.json'), 'w'))
  with pytest.raises(ConfigError, match='lacks 9 weights of a MistralForCausalLM.*layers.2'):
    from_hf.convert_checkpoint(hf_dir, str(tmp_path / 'out'))


# Converts a folder in a fresh process; prints its resident memory before converting (after the
# imports) and its peak (VmHWM: ru_maxrss would carry over the parent's peak across exec), MiB.
CONVERT_AND_MEASURE = r'''
import json, sys
import jax
from gpt_jax.convert import from_hf

def status(field):
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

jax.devices()
before = status('VmRSS')
_, params, _ = from_hf.convert_checkpoint(sys.argv[1], sys.argv[2])
shards = params['block_0']['mlp']['fc_in']['kernel'].addressable_shards
print(json.dumps({'before': before, 'peak': status('VmHWM'), 'shards': len(shards),
                  'shard_shape': shards[0].data.shape}))
'''


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads /proc')
def test_sharded_conversion_holds_the_weights_about_once(tmp_path):
  """A 200 MiB float32 checkpoint in 9 files converts with a peak well below two copies, each
  parameter split over the devices."""
  from safetensors.numpy import save_file
  from gpt_jax.convert import llama
  hf = dict(model_type='llama', vocab_size=4096, hidden_size=512, intermediate_size=1536,
            num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  (hf_dir / 'config.json').write_text(json.dumps(hf))
  rng = np.random.default_rng(0)
  shards, shard, weight_map, total = [], {}, {}, 0
  for name, shape in llama.hf_shapes(llama.model_fields_from_hf(hf)).items():
    shard[name] = rng.standard_normal(shape, np.float32)
    total += shard[name].nbytes
    if sum(x.nbytes for x in shard.values()) > 24e6:
      shards.append(shard)
      shard = {}
  shards.append(shard)
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, str(hf_dir / file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(shard, file))
  (hf_dir / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  del shards, shard

  proc = subprocess.run([sys.executable, '-c', CONVERT_AND_MEASURE, str(hf_dir),
                         str(tmp_path / 'out')], capture_output=True, text=True,
                        env=module_env(devices=2), check=True, timeout=300)
  memory = json.loads(proc.stdout.strip().splitlines()[-1])
  weights = total / 2**20
  assert 190 < weights < 210
  assert memory['shards'] == 2 and memory['shard_shape'] == [256, 1536]  # [emb / 2, mlp]
  # Measured 1.55-1.63x (3.5x with Orbax's defaults): experiments/convert_memory/README.md.
  assert memory['peak'] - memory['before'] < 1.75 * weights, (memory, weights)


def test_bfloat16_checkpoint_is_upcast_exactly(tmp_path):
  model = save_hf_model(str(tmp_path / 'f32'), 'qwen2').to(torch.bfloat16)
  model.save_pretrained(str(tmp_path / 'bf16'))
  from_hf.convert_checkpoint(str(tmp_path / 'bf16'), str(tmp_path / 'out'))
  _, params, _ = checkpoint.load_model(str(tmp_path / 'out'))
  expected = model.model.layers[1].self_attn.k_proj.bias.detach().float().numpy()
  ours = params['block_1']['attn']['key']['bias']
  assert ours.dtype == np.float32 and np.array_equal(np.asarray(ours).reshape(-1), expected)
