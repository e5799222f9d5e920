"""The base experiment config and its validation. Files in configs/ start from `base_config()`."""

import dataclasses

import ml_collections

from gpt_jax import kernels
from gpt_jax.model import LORA_TARGETS, LoraConfig, ModelConfig
from gpt_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, grouped by concern. Model fields are documented in ModelConfig."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order and dropout all derive from it
  c.init_from = ''  # a workdir whose parameters initialise this run ('' -> random)
  c.init_step = -1  # init_from's checkpoint step; -1: its latest (recorded in config.json)

  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
  c.model.head_dim = 0    # 0: emb_dim // num_heads

  c.data = ml_collections.ConfigDict()
  c.data.tfds_name = 'pydoc_topics'  # any registered TFDS dataset; ours: pydoc_topics, text_files
  c.data.tfds_data_dir = ''          # '' -> TFDS default (~/tensorflow_datasets)
  c.data.text_key = 'text'           # feature holding the document text
  c.data.train_split = 'train'
  c.data.val_split = 'validation'
  c.data.text_files = ''             # glob of local text files; when set, wins over tfds_name
  c.data.val_fraction = 0.1          # text_files / pydoc_topics: last fraction of each document
  c.data.tokenizer = 'sentencepiece'  # 'sentencepiece' | 'char' | 'byte'
  c.data.vocab_size = 1024           # sentencepiece vocabulary to train
  c.data.spm_model = ''              # an existing sentencepiece .model ('' -> train one)
  c.data.spm_train_chars = 20_000_000  # cap on characters fed to sentencepiece training
  c.data.batch_size = 16             # global batch, in sequences per optimizer step
  c.data.eval_batch_size = 0         # sequences per validation batch in training; 0 -> batch_size
  c.data.seq_len = 128               # tokens per training sequence (<= model.max_len)
  c.data.cache_dir = ''              # tokenized corpus cache; '' -> <workdir>/data_cache
  c.data.prefetch = 2                # batches prepared ahead in background threads
  c.data.streaming = 'auto'          # 'true': read, tokenize and pack on the fly on every host;
                                     # 'false': tokenize once into a cached stream; 'auto':
                                     # stream above data.STREAM_ABOVE_BYTES (256 MiB) of text
  c.data.worker_count = 2            # streaming: tokenizer processes per host (0: in-process)
  c.data.shuffle_buffer = 1024       # streaming: packed windows shuffled together (0: none)
  c.data.document_masking = False    # segment ids at document ends: attention stays within one
  # Chat fine-tuning (gpt_jax.finetune): JSONL conversations instead of a text corpus.
  c.data.chat_files = ''             # glob of chat JSONL files; when set, the run is chat SFT
  c.data.val_chat_files = ''         # glob of validation conversations ('' -> no evaluation)
  c.data.on_bad_lines = 'raise'      # a malformed JSONL line: 'raise' or 'skip' (with a warning)
  c.data.long_conversations = 'truncate'  # longer than seq_len + 1 tokens: 'truncate' or 'drop'
  c.data.vocab_multiple = 64         # a grown vocabulary is rounded up to a multiple of this

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'             # or 'muon': Muon on hidden matrices, AdamW on the rest
  c.optim.lr = 1e-3                  # peak learning rate (AdamW's, with muon too)
  c.optim.muon_lr = 0.02             # Muon's peak learning rate (optim.name='muon')
  c.optim.muon_momentum = 0.95
  c.optim.muon_ns_steps = 5          # Newton-Schulz iterations that orthogonalize each update
  c.optim.muon_ns_coeffs = 'standard'  # their coefficients: 'standard' or 'polar_express'
  c.optim.warmup_steps = 100
  c.optim.decay_steps = 0            # cosine decay length; 0 -> train.num_steps
  c.optim.min_lr_ratio = 0.1         # final lr = lr * min_lr_ratio
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_matrices_only = True  # no weight decay on biases and norm scales
  c.optim.grad_clip = 1.0            # global-norm clipping; 0 disables
  c.optim.grad_accum_steps = 1       # micro-batches per optimizer step (splits data.batch_size)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000           # optimizer steps
  c.train.log_every = 50
  c.train.eval_every = 250           # 0 disables evaluation during training
  c.train.eval_batches = 8           # validation batches per evaluation
  c.train.sample_prompt = ''         # text of the sample printed at the end ('' -> from scratch)
  c.train.sample_tokens = 200        # 0 disables the final sample
  c.train.measure_peak = True        # time a matmul at start-up for the MFU denominator
  c.train.progress_bar = True
  c.train.tensorboard = True         # event files in <workdir>/tensorboard beside metrics.jsonl
  c.train.compilation_cache = True   # reuse compiled steps across restarts (<workdir>/jax_cache)
  c.train.on_nonfinite = 'halt'     # non-finite loss/gradient: 'halt' or 'skip' the update

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                    # 0: train every parameter; > 0: only LoRA adapters
  c.lora.alpha = 16.0                # the adapters' update is scaled by alpha / rank
  c.lora.dropout = 0.0               # on the adapters' inputs
  c.lora.targets = ('query', 'key', 'value', 'out')  # also fc_in, fc_gate, fc_out
  c.lora.train_chat_tokens = True    # with rank > 0, also train the embedding rows of the
                                     # chat template's special tokens (docs/finetuning.md)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.num_slices = 1              # TPU slices (multi-slice): data's outer factor spans them
  c.mesh.rules = ()                  # (logical name, mesh axes) pairs over sharding.LOGICAL_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500     # also saved at the last step
  c.checkpoint.keep = 3              # newest checkpoints kept
  c.checkpoint.async_save = True     # write in the background while training goes on
  return c


def llama_pretraining_config(num_layers: int, emb_dim: int, num_heads: int, num_kv_heads: int,
                             mlp_dim: int, vocab_size: int, seq_len: int,
                             batch_size: int) -> ml_collections.ConfigDict:
  """A Llama-layout model (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied embeddings)
  pretraining on a TFDS corpus with a sentencepiece vocabulary, set for TPU slices: bf16
  compute over float32 weights and AdamW, full remat, scanned layers, pure FSDP."""
  config = base_config()
  config.data.tfds_name = 'c4'
  config.data.vocab_size = vocab_size
  config.data.seq_len = seq_len
  config.data.batch_size = batch_size
  config.data.prefetch = 4
  config.data.streaming = 'true'  # every host tokenizes its own share (gpt_jax/streaming.py)
  config.data.worker_count = 8

  model = config.model
  model.vocab_size, model.max_len = vocab_size, seq_len
  model.num_layers, model.emb_dim, model.mlp_dim = num_layers, emb_dim, mlp_dim
  model.num_heads, model.num_kv_heads = num_heads, num_kv_heads
  model.position, model.rope_theta = 'rope', 500_000.0
  model.norm, model.mlp, model.use_bias, model.tie_embeddings = 'rmsnorm', 'swiglu', False, False
  model.dropout, model.compute_dtype = 0.0, 'bfloat16'
  model.remat, model.scan_layers = 'full', True

  config.mesh.data, config.mesh.fsdp = 1, -1
  config.optim.lr, config.optim.warmup_steps, config.optim.b2 = 3e-4, 2000, 0.95
  config.train.num_steps, config.train.log_every = 100_000, 100
  config.train.eval_every, config.train.eval_batches = 2000, 20
  config.train.sample_tokens = 0
  config.checkpoint.every_steps = 1000
  return config


def validate(config) -> None:
  """Checks a config before anything is built; each error names the field at fault."""
  model = ModelConfig.from_config(config.model)
  _choice('model.position', model.position, ('learned', 'rope'))
  _choice('model.rope_scaling', model.rope_scaling, ('none', 'llama3'))
  _choice('model.norm', model.norm, ('layernorm', 'rmsnorm'))
  _choice('model.mlp', model.mlp, ('gelu', 'swiglu'))
  _choice('data.tokenizer', config.data.tokenizer, ('sentencepiece', 'char', 'byte'))
  _choice('train.on_nonfinite', config.train.on_nonfinite, ('halt', 'skip'))
  _choice('optim.name', config.optim.name, ('adamw', 'muon'))
  _choice('optim.muon_ns_coeffs', config.optim.muon_ns_coeffs, ('standard', 'polar_express'))
  _choice('model.attention', model.attention, kernels.ATTENTION)
  _choice('model.remat', model.remat, ('none', 'full', 'dots_saveable', 'projections'))
  for dtype_field in ('compute_dtype', 'param_dtype', 'residual_dtype'):
    _choice(f'model.{dtype_field}', getattr(model, dtype_field), ('float32', 'bfloat16', 'float16'))
  positive = {
      'model.num_layers': model.num_layers, 'model.num_heads': model.num_heads,
      'model.emb_dim': model.emb_dim, 'model.mlp_dim': model.mlp_dim,
      'model.max_len': model.max_len, 'model.scan_unroll': model.scan_unroll,
      'data.batch_size': config.data.batch_size,
      'data.seq_len': config.data.seq_len, 'train.num_steps': config.train.num_steps,
      'train.log_every': config.train.log_every,
      'mesh.num_slices': config.mesh.get('num_slices', 1), 'optim.grad_accum_steps':
      config.optim.grad_accum_steps, 'checkpoint.every_steps': config.checkpoint.every_steps}
  for name, value in positive.items():
    if value <= 0:
      raise ConfigError(f'config.{name} must be positive, got {value}')
  if config.data.eval_batch_size < 0:
    raise ConfigError(f'config.data.eval_batch_size must be 0 (data.batch_size) or positive, '
                      f'got {config.data.eval_batch_size}')
  if not config.model.get('head_dim') and model.emb_dim % model.num_heads:
    raise ConfigError(f'config.model.emb_dim ({model.emb_dim}) must be divisible by '
                     f'model.num_heads ({model.num_heads})')
  if model.num_heads % model.kv_heads:
    raise ConfigError(f'config.model.num_heads ({model.num_heads}) must be divisible by '
                     f'model.num_kv_heads ({model.kv_heads})')
  if model.position == 'rope' and model.head_dim % 2:
    raise ConfigError(f'rope needs an even head dim, got {model.head_dim}')
  if config.optim.muon_ns_coeffs == 'polar_express':
    from gpt_jax.optim import POLAR_EXPRESS_COEFFS  # pylint: disable=import-outside-toplevel
    if not 1 <= config.optim.muon_ns_steps <= len(POLAR_EXPRESS_COEFFS):
      raise ConfigError(f'config.optim.muon_ns_steps ({config.optim.muon_ns_steps}) must be 1 to '
                        f'{len(POLAR_EXPRESS_COEFFS)} with optim.muon_ns_coeffs=polar_express')
  if model.loss_chunk < 0 or (model.loss_chunk and config.data.seq_len % model.loss_chunk):
    raise ConfigError(f'config.model.loss_chunk ({model.loss_chunk}) must be 0 (off) or divide '
                      f'data.seq_len ({config.data.seq_len})')
  if config.data.seq_len > model.max_len:
    raise ConfigError(f'config.data.seq_len ({config.data.seq_len}) exceeds '
                     f'config.model.max_len ({model.max_len})')
  if config.data.batch_size % config.optim.grad_accum_steps:
    raise ConfigError(f'config.data.batch_size ({config.data.batch_size}) must be divisible by '
                     f'optim.grad_accum_steps ({config.optim.grad_accum_steps})')
  if not 0 <= model.dropout < 1:
    raise ConfigError(f'config.model.dropout must be in [0, 1), got {model.dropout}')
  if not (config.data.text_files or config.data.tfds_name or config.data.chat_files):
    raise ConfigError('Set config.data.tfds_name or config.data.text_files')
  _choice('data.on_bad_lines', config.data.on_bad_lines, ('raise', 'skip'))
  _choice('data.long_conversations', config.data.long_conversations, ('truncate', 'drop'))
  _choice('data.streaming', config.data.streaming, ('auto', 'true', 'false'))
  for field in ('worker_count', 'shuffle_buffer'):
    if config.data[field] < 0:
      raise ConfigError(f'config.data.{field} must be >= 0, got {config.data[field]}')
  if config.data.chat_files and not config.init_from:
    raise ConfigError('config.data.chat_files fine-tunes a pretrained model: set init_from '
                      '(python -m gpt_jax.finetune --init_from=WORKDIR)')
  if config.data.vocab_multiple <= 0:
    raise ConfigError(f'config.data.vocab_multiple must be positive, got '
                      f'{config.data.vocab_multiple}')
  lora = config.lora
  if lora.rank < 0:
    raise ConfigError(f'config.lora.rank must be >= 0, got {lora.rank}')
  if lora.rank:
    if not config.init_from:
      raise ConfigError('config.lora.rank > 0 adapts a pretrained model: set init_from')
    unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
    if unknown or not lora.targets:
      raise ConfigError(f'config.lora.targets {tuple(lora.targets)} must be a non-empty subset '
                        f'of {LORA_TARGETS}')
    if not 0 <= lora.dropout < 1:
      raise ConfigError(f'config.lora.dropout must be in [0, 1), got {lora.dropout}')


def _choice(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f'config.{name} must be one of {allowed}, got {value!r}')


def lora_config(config):
  """The run's model.LoraConfig (rank 0: no adapters); older configs have no `lora` group."""
  lora = config.get('lora') or {}
  if not lora or not lora.get('rank'):
    return LoraConfig()
  return LoraConfig(rank=lora['rank'], alpha=lora['alpha'], dropout=lora['dropout'],
                    targets=tuple(lora['targets']))
