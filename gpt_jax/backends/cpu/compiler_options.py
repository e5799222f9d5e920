"""XLA:CPU compiler options, each measured against the default."""

# Programs that update a KV cache: XLA:CPU's copy insertion without region analysis copied every
# layer's cache twice per decoded token inside the decoding loop (about a fifth of the step at
# batch 1, a quarter at batch 8; experiments/bench_decode).
CACHE_UPDATES = {'xla_cpu_copy_insertion_use_region_analysis': True}

# A program run once (initialisation) compiles in half the time at optimisation level 0.
RUN_ONCE = {'xla_backend_optimization_level': 0}
