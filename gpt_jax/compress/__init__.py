"""Smaller models from trained ones: knowledge distillation and structured pruning (the commands:
distill, prune)."""
