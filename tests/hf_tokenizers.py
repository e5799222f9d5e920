"""Small Hugging Face tokenizers built locally (no download), in the layouts real models ship:
byte-level BPE with Llama 3's or Qwen2's special tokens and chat templates, and a
sentencepiece-style BPE (Metaspace, byte fallback, BOS added) with Mistral's template."""

import json
import os

import pydoc_data.topics

from gpt_jax import tokenizer as tokenizer_lib

# Llama 3.x instruct's template, without its tool-calling branches.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if system_message %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")

# Qwen2.5 instruct's template, without its tool-calling branches: a default system message.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Mistral instruct v0.3's template (system message folded into the last user turn; strict
# alternation, enforced with raise_exception).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}")

STYLES = {
    'llama3': dict(specials=['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                             '<|end_header_id|>', '<|eot_id|>'],
                   bos='<|begin_of_text|>', eos='<|eot_id|>', template=LLAMA3_TEMPLATE),
    'qwen2': dict(specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'], bos=None,
                  eos='<|im_end|>', template=QWEN2_TEMPLATE),
    'mistral': dict(specials=['<unk>', '<s>', '</s>', '[INST]', '[/INST]'], bos='<s>',
                    eos='</s>', template=MISTRAL_TEMPLATE),
}


def corpus() -> list[str]:
  return list(pydoc_data.topics.topics.values())[:12]


def build(directory: str, style: str, vocab_size: int = 400, chat_template: bool = True,
          template_file: bool = False) -> str:
  """Trains a tiny tokenizer in `style` and saves tokenizer.json + tokenizer_config.json (the
  chat template inside it, or in chat_template.jinja as transformers 5 saves it)."""
  from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                          processors, trainers)
  spec = STYLES[style]
  if style == 'mistral':
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>', fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                           normalizers.Replace(' ', '▁')])
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, show_progress=False,
                                  limit_alphabet=40,
                                  special_tokens=spec['specials']
                                  + [f'<0x{i:02X}>' for i in range(256)])
    tok.train_from_iterator([t.replace(' ', '▁') for t in corpus()], trainer)
  else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == 'qwen2':  # Qwen2's: NFC, digits one by one (transformers' Qwen2Tokenizer)
      tok.normalizer = normalizers.NFC()
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(tokenizer_lib.QWEN2_PRETOKENIZE_REGEX),
                               behavior='isolated'),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec['specials'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
  if spec['bos']:
    bos = (spec['bos'], tok.token_to_id(spec['bos']))
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos[0]} $A', pair=f'{bos[0]} $A {bos[0]} $B', special_tokens=[bos])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  # The classes the models ship: transformers 5 runs Llama 3's PreTrainedTokenizerFast from
  # tokenizer.json as it is, and rebuilds Qwen2Tokenizer's and LlamaTokenizerFast's pipelines
  # (Mistral's legacy normalizer above becomes a Metaspace pre-tokenizer).
  tokenizer_class = {'llama3': 'PreTrainedTokenizerFast', 'qwen2': 'Qwen2Tokenizer',
                     'mistral': 'LlamaTokenizerFast'}[style]
  config = {'tokenizer_class': tokenizer_class, 'bos_token': spec['bos'],
            'eos_token': spec['eos'], 'clean_up_tokenization_spaces': False,
            'model_max_length': 4096}
  if chat_template and not template_file:
    config['chat_template'] = spec['template']
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if chat_template and template_file:
    with open(os.path.join(directory, 'chat_template.jinja'), 'w') as f:
      f.write(spec['template'])
  return directory
