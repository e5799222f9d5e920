"""Hugging Face GPT-2 <-> gpt_jax: exact logits, identical greedy text, bit-identical round trip."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics
import pytest

from conftest import run_module
from gpt_jax import checkpoint, decode
from gpt_jax.convert import gpt2
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import from_hf, to_hf
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 300


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random tiny GPT2LMHeadModel with a small GPT-2 BPE vocabulary, saved as HF does."""
  from tokenizers.implementations import ByteLevelBPETokenizer
  directory = str(tmp_path_factory.mktemp('hf'))
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(list(pydoc_data.topics.topics.values())[:10], vocab_size=VOCAB,
                          special_tokens=['<|endoftext|>'], show_progress=False)
  bpe.save_model(directory)
  torch.manual_seed(0)
  # A wide init makes the next-token distribution peaked, so greedy choices are not near-ties.
  config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  return directory


@pytest.fixture(scope='module')
def converted(hf_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('converted'))
  from_hf.convert_checkpoint(hf_dir, workdir)
  return workdir


@pytest.fixture(scope='module')
def hf_model(hf_dir):
  return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_logits_match_transformers(converted, hf_model):
  cfg, params, step = checkpoint.load_model(converted)
  assert step == 0 and cfg.vocab_size == VOCAB and cfg.max_len == 64 and cfg.mlp_dim == 128
  tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 64))
  ours, _ = Transformer(cfg).apply({'params': params}, tokens)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize('penalty', [1.0, 1.5])
def test_greedy_generation_matches_transformers(converted, hf_model, penalty):
  cfg, params, _ = checkpoint.load_model(converted)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, VOCAB, n)) for n in (5, 17, 30)]
  ours = decode.Generator(cfg, params).generate(prompts, 32, temperature=0,
                                                repetition_penalty=penalty)
  for prompt, tokens in zip(prompts, ours):
    theirs = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                  dtype=torch.long),
                               max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               repetition_penalty=penalty, pad_token_id=0)
    assert tokens == theirs[0, len(prompt):].tolist()


def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, hf_model, tmp_path):
  out = str(tmp_path / 'hf')
  to_hf.export(converted, out)
  assert {'config.json', 'model.safetensors', 'vocab.json', 'merges.txt'} <= set(os.listdir(out))
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 40))
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))

  again = str(tmp_path / 'again')
  from_hf.convert_checkpoint(out, again)
  _, first, _ = checkpoint.load_model(converted)
  _, second, _ = checkpoint.load_model(again)
  same = jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                      first, second)
  assert all(jax.tree.leaves(same))
  assert checkpoint.load_config(again).model == checkpoint.load_config(converted).model


def test_every_gpt2_size_maps_onto_the_model():
  """124M, 355M, 774M, 1.5B: HF's weight shapes, converted, are exactly the model's params."""
  for layers, emb, heads in ((12, 768, 12), (24, 1024, 16), (36, 1280, 20), (48, 1600, 25)):
    hf_config = transformers.GPT2Config(n_layer=layers, n_embd=emb, n_head=heads)
    with torch.device('meta'):
      hf = transformers.GPT2LMHeadModel(hf_config)
    hf_shapes = {k.removeprefix('transformer.'): tuple(v.shape)
                 for k, v in hf.state_dict().items() if k != 'lm_head.weight'}
    model = gpt2.model_fields_from_hf(hf_config.to_dict())
    assert gpt2.hf_shapes(model) == hf_shapes
    tensors = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in hf_shapes.items()}
    ours = jax.eval_shape(lambda t: gpt2.hf_to_params(t, model), tensors)
    expected = nn.unbox(jax.eval_shape(lambda: Transformer(ModelConfig(**model)).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))['params']
    assert jax.tree.map(lambda x: x.shape, ours) == jax.tree.map(lambda x: x.shape, expected)


def test_gpt2_bpe_tokenizer_matches_transformers(hf_dir, converted):
  ours = tokenizer_lib.load(os.path.join(converted, 'tokenizer'))
  theirs = transformers.GPT2Tokenizer.from_pretrained(hf_dir)
  text = 'Hello  world!\n\n  def f(x):\treturn café, 中文 😀👩\u200d💻 <|endoftext|> end'
  assert ours.encode(text) == theirs(text)['input_ids']
  assert ours.eos_id == theirs.convert_tokens_to_ids('<|endoftext|>')
  plain = text.replace('<|endoftext|>', '')
  assert ours.decode(ours.encode(plain)) == plain
  assert ours.decode(ours.encode('😀')[:1]) == '\ufffd'  # half a character: replaced, no error


def test_errors_name_the_problem(hf_dir, converted, tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    from_hf.convert_checkpoint(str(tmp_path / 'missing'), str(tmp_path / 'w'))
  bert = tmp_path / 'bert'
  bert.mkdir()
  (bert / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  with pytest.raises(ConfigError, match="model_type 'bert'; gpt_jax converts gpt2, llama"):
    from_hf.convert_checkpoint(str(bert), str(tmp_path / 'w'))
  (bert / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  with pytest.raises(ConfigError, match='config.json of a llama model lacks vocab_size, '):
    from_hf.convert_checkpoint(str(bert), str(tmp_path / 'w'))
  with pytest.raises(ConfigError, match='already holds checkpoints'):
    from_hf.convert_checkpoint(hf_dir, converted)
  # A RoPE model with LayerNorm is neither a GPT-2 nor a Llama.
  rope = tmp_path / 'rope'
  config = checkpoint.load_config(converted)
  config.model.position = 'rope'
  checkpoint.save_config(str(rope), config)
  with pytest.raises(ConfigError, match="config.model.norm='layernorm'.*neither the GPT-2 nor"):
    to_hf.export(str(rope), str(tmp_path / 'out'))
  config.model.position = 'learned'
  config.model.qk_norm = True
  checkpoint.save_config(str(tmp_path / 'qk_norm'), config)
  with pytest.raises(ConfigError, match='config.model.qk_norm=True.*not in the GPT-2 layout'):
    to_hf.export(str(tmp_path / 'qk_norm'), str(tmp_path / 'out'))
  # The binaries print one line.
  proc = run_module('gpt_jax.convert.from_hf', f'--hf_dir={tmp_path / "missing"}',
                    f'--workdir={tmp_path / "w"}', check=False)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      f'error: --hf_dir {tmp_path / "missing"} is not a directory']


def test_converted_workdir_samples_and_initialises_training(converted):
  proc = run_module('gpt_jax.sample', f'--workdir={converted}', '--prompt=The ',
                    '--max_new_tokens=8', '--temperature=0')
  assert proc.stdout.startswith('The ') and len(proc.stdout) > len('The \n')
  # What gpt_jax.train does with --config.init_from=<converted> for a run of the same model.
  config = checkpoint.load_config(converted)
  model_cfg = ModelConfig.from_config(config.model)
  checkpoint.check_compatible(converted, model_cfg)
  abstract = nn.unbox(jax.eval_shape(lambda: Transformer(model_cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))['params']
  params, step = checkpoint.restore_params(converted, abstract)
  assert step == 0 and jax.tree.structure(params) == jax.tree.structure(abstract)
