"""Forms that keep XLA:CPU on its fast paths, chosen by gpt_jax.backends for CPU meshes only."""
