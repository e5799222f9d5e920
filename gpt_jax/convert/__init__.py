"""Formats in and out: Hugging Face checkpoints (gpt2.py and llama.py hold the mappings;
from_hf, to_hf and merge_lora are the commands) and exported programs (export.py, onnx_decode.py)."""
