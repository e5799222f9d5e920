"""The platform a program is compiled for, which is not always the host's.

A program traced under `jax.set_mesh(mesh)` runs on the mesh's devices: compiled on a CPU host
for compile-only TPU devices (gpt_jax.aot), it must be the program a TPU host would build. So
every choice of a platform-specific code path asks `platform()`, never
`jax.default_backend()`. Outside a mesh, a program runs on the default device.
"""

import jax


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the current mesh's devices, else of the default
  device."""
  device = jax.sharding.get_abstract_mesh().abstract_device  # readable inside jit too
  if device is not None:
    return device.platform
  return jax.devices()[0].platform


def is_cpu() -> bool:
  return platform() == 'cpu'
