"""Supervised fine-tuning for chat: conversations as packed batches, chat templates (gpt_jax's and
Hugging Face's Jinja ones), and the fine-tuning recipe for the train loop (command: finetune)."""
