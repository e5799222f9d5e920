"""docs/interop.md's Llama-family workflow on a random-weight model built locally: convert, sample,
evaluate, LoRA fine-tuning on chat data with the model's own template, serving (chat and text
completions), and the fine-tuned model converted back to transformers. (`eval --chat_files` renders
conversations as fine-tuning data does: tests/test_hf_chat_template.py.)"""

import json
import os

import numpy as np
import pytest
from fastapi import testclient

from conftest import run_module
import hf_tokenizers
from gpt_jax import checkpoint
from gpt_jax.inference import server as server_lib
from gpt_jax.convert import from_hf, merge_lora, to_hf
from gpt_jax.model import Transformer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CONVERSATIONS = [
    [{'role': 'system', 'content': 'Answer briefly.'},
     {'role': 'user', 'content': f'What is {a} plus {b}?'},
     {'role': 'assistant', 'content': f'{a + b}.'}]
    for a in range(4) for b in range(3)]


def test_convert_finetune_eval_serve_and_convert_back(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None))
  hf_model.save_pretrained(hf_dir)
  hf_tokenizers.build(hf_dir, 'llama3', vocab_size=300, template_file=True)
  chat_file = tmp_path / 'chat.jsonl'
  chat_file.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in CONVERSATIONS))

  base, sft = str(tmp_path / 'base'), str(tmp_path / 'sft')
  from_hf.convert_checkpoint(hf_dir, base)

  # The converted model samples transformers' greedy continuation and evaluates.
  theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  prompt = theirs('The sum')['input_ids']
  with torch.no_grad():
    greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
  printed = run_module('gpt_jax.sample', f'--workdir={base}', '--prompt=The sum',
                       '--max_new_tokens=6', '--temperature=0').stdout
  assert printed == 'The sum' + theirs.decode(greedy[0, len(prompt):]) + '\n'
  text_file = tmp_path / 'text.txt'
  text_file.write_text('What is 1 plus 2? It is 3. ' * 40)
  evaluated = run_module('gpt_jax.eval', f'--workdir={base}', f'--text_files={text_file}',
                         '--split=validation', '--progress_bar=false').stdout
  loss = float(evaluated.split(' loss ')[1].split(',')[0])
  assert abs(loss - np.log(320)) < 0.5  # a random model: about uniform over its vocabulary

  run_module('gpt_jax.finetune', '--config=configs/sft.py', f'--init_from={base}',
             f'--workdir={sft}', f'--config.data.chat_files={chat_file}',
             '--config.lora.rank=4', '--config.data.batch_size=4', '--config.train.num_steps=2',
             '--config.train.eval_every=0', '--config.train.sample_tokens=0',
             '--config.train.progress_bar=False', '--config.train.measure_peak=False')
  # The model's own template: no tokens added, the vocabulary as it was.
  assert checkpoint.load_config(sft).model.vocab_size == 320
  assert (open(os.path.join(sft, 'tokenizer', 'huggingface', 'chat_template.jinja')).read()
          == hf_tokenizers.LLAMA3_TEMPLATE)
  # Serving: the chat prompt is what transformers' apply_chat_template makes of the messages,
  # a text prompt what AutoTokenizer makes of it (BOS first).
  messages = CONVERSATIONS[5][:2]
  expected = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
  server = server_lib.load(sft, slots=1)  # in-process: the binary's function, without its start-up
  try:
    with testclient.TestClient(server_lib.create_app(server)) as http:
      response = http.post('/v1/chat/completions', json={
          'model': server.model_name, 'messages': messages, 'max_tokens': 4, 'temperature': 0})
      assert response.status_code == 200, response.text
      assert response.json()['usage']['prompt_tokens'] == len(expected)
      response = http.post('/v1/completions', json={
          'model': server.model_name, 'prompt': 'The sum', 'max_tokens': 4, 'temperature': 0})
      assert response.json()['usage']['prompt_tokens'] == len(theirs('The sum')['input_ids'])
  finally:
    server.engine.stop()

  merged, out = str(tmp_path / 'merged'), str(tmp_path / 'sft_hf')
  merge_lora.merge(sft, merged)
  to_hf.export(merged, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.asarray([expected])
  cfg, params, _ = checkpoint.load_model(sft)
  ours, _ = Transformer(cfg).apply({'params': params}, tokens)
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(tokens)).logits.numpy(), np.asarray(ours),
                               atol=1e-4, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
      messages, add_generation_prompt=True, return_dict=False) == expected
