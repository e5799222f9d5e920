"""The platform a program is compiled for, which is not always the host's.

A program traced under `jax.set_mesh(mesh)` runs on the mesh's devices: compiled on a CPU host
for compile-only TPU devices (gpt_jax.aot), it must be the program a TPU host would build. So
every choice of a platform-specific code path asks `platform()`, never
`jax.default_backend()`. Outside a mesh, a program runs on the default device.
"""

import importlib.util
import os

import jax
from jax._src import hardware_utils


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the current mesh's devices, else of the default
  device."""
  device = jax.sharding.get_abstract_mesh().abstract_device  # readable inside jit too
  if device is not None:
    return device.platform
  return jax.devices()[0].platform


def is_cpu() -> bool:
  return platform() == 'cpu'


def skip_absent_tpu() -> None:
  """On a host with libtpu installed but no TPU chip (it compiles for TPUs: gpt_jax.aot) and no
  GPU, JAX computes on the CPU without first trying to start libtpu, which prints warnings and
  takes a machine-wide lock. Call before JAX starts; JAX_PLATFORMS, when set, decides."""
  if (not os.environ.get('JAX_PLATFORMS') and importlib.util.find_spec('libtpu') is not None
      and not hardware_utils.num_available_tpu_chips_and_device_id()[0]
      and not hardware_utils.has_visible_nvidia_gpu()):
    jax.config.update('jax_platforms', 'cpu')
