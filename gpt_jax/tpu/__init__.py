"""Cloud TPU slices from any host: chips and topologies, the compiled step's memory, FLOPs and
collectives, and a roofline (the command: aot)."""
