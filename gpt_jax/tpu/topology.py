"""Cloud TPU slices: accelerator types, the topologies libtpu compiles for, each chip's figures.

`Slice.parse('v5p-8')` names a slice as Cloud TPU does; `slice.devices()` gives libtpu's
compile-only devices for it (no TPU needed: gpt_jax.aot compiles for them on any host with the
`libtpu` wheel). v4 and v5p accelerator types count TensorCores (two per chip: v5p-8 is 4 chips),
v5e (alias v5litepod) and v6e count chips (https://cloud.google.com/tpu/docs/types-topologies,
https://cloud.google.com/tpu/docs/v5p-training, https://cloud.google.com/tpu/docs/v6e).
"""

import dataclasses
import math
import os
import re

from gpt_jax.errors import ConfigError

GB, GiB = 1e9, 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's published figures (per chip; bandwidths in bytes/s; None: not published)."""
  generation: str          # libtpu's name
  hbm_bytes: float
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float | None   # bidirectional, all of the chip's links
  dcn_bytes_per_s: float | None   # the host's network share of one chip
  cores_per_name_unit: int  # accelerator types count TensorCores (2 per chip) or chips (1)
  torus_dims: int
  source: str


CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, 1200 * GB, None, None, 2, 3,
               'https://cloud.google.com/tpu/docs/v4 (32 GiB, 1200 GBps, 275 TFLOPs; ICI and '
               'DCN bandwidth not published there)'),
    'v5e': Chip('v5e', 16 * GB, 197e12, 819 * GB, 400 * GB, 200e9 / 8 / 8, 1, 2,
                'https://cloud.google.com/tpu/docs/v5e (16 GB, 819 GBps, 197 TFLOPs, ICI 400 '
                'GBps bidirectional; 2 x 100 Gbps NICs per 8-chip host)'),
    'v5p': Chip('v5p', 95 * GiB, 459e12, 2765 * GB, 1200 * GB, 50e9 / 8, 2, 3,
                'https://cloud.google.com/tpu/docs/v5p-training (95 GiB, 2765 GBps, 459 TFLOPs, '
                'ICI 1200 GBps bidirectional, DCN 50 Gbps per chip)'),
    'v6e': Chip('v6e', 32 * GB, 918e12, 1638 * GB, 800 * GB, 800e9 / 8 / 8, 1, 2,
                'https://cloud.google.com/tpu/docs/v6e (32 GB, 1638 GBps, 918 TFLOPs, ICI 800 '
                'GBps bidirectional; 4 x 200 Gbps NICs per 8-chip host)'),
}
_ALIASES = {'v5litepod': 'v5e'}


def torus(chips: int, dims: int) -> tuple[int, ...] | None:
  """The torus Cloud TPU builds for `chips` chips (e.g. 16 v5p chips: 2x2x4), or None."""
  shape = [1] * dims
  if chips >= 4:
    shape[:2] = [2, 2]
    if dims == 3 and chips >= 8:
      shape[2] = 2
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, size in enumerate(shape) if size == smallest)
    shape[last] *= 2
  return tuple(shape) if math.prod(shape) == chips else None


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                 # as given, e.g. 'v5p-8'
  chip: Chip
  shape: tuple[int, ...]    # chips along each torus axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. 'v5p:2x2x1'."""
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'

  @classmethod
  def parse(cls, name: str, num_slices: int = 1) -> 'Slice':
    """'v5p-8', 'v5e-16', 'v5litepod-4', 'v6e-256', 'v4-32', or libtpu's 'v5p:2x2x4'."""
    match = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))', name.strip())
    if not match:
      raise ConfigError(f'Unknown TPU topology {name!r}: give a Cloud TPU accelerator type '
                        '(v4-N, v5e-N / v5litepod-N, v5p-N, v6e-N) or a torus like v5p:2x2x4')
    generation, count, dims = match.groups()
    chip = CHIPS[_ALIASES.get(generation, generation)]
    if dims:
      shape = tuple(int(d) for d in dims.split('x'))
    else:
      if int(count) % chip.cores_per_name_unit:
        raise ConfigError(f'{name}: {generation} accelerator types count TensorCores, two per '
                          'chip, so N must be even')
      chips = int(count) // chip.cores_per_name_unit
      shape = torus(chips, chip.torus_dims)
      if shape is None:
        sizes = [2 ** i * chip.cores_per_name_unit for i in range(2 if chip.torus_dims == 3
                                                                 else 0, 13)]
        raise ConfigError(f'{name}: no {generation} slice has {chips} chips; sizes here: '
                          f'{generation}-' + ', '.join(str(s) for s in sizes if s != 2))
    if num_slices < 1:
      raise ConfigError(f'num_slices must be positive, got {num_slices}')
    return cls(name, chip, shape, num_slices)

  def devices(self) -> list:
    """libtpu's compile-only devices of this slice (all slices), one per chip."""
    # Without these libtpu looks for a TPU VM's metadata and prints warnings; any valid type
    # does, whatever the topology asked for. Several processes may compile at once.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
      from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
      options = {}
      if self.chip.generation == 'v4':
        options['chip_config_name'] = 'megacore'  # one device per chip, as v4 runs
      if self.chip.torus_dims == 2 and math.prod(self.shape) in (1, 8):
        # hosts of 1 or 8 chips; libtpu's default host is 2x2
        options['chips_per_host_bounds'] = [1, 1, 1] if self.shape == (1, 1) else [2, 4, 1]
      if self.num_slices > 1:
        options['num_slices'] = self.num_slices
      return list(topologies.get_topology_desc(self.topology, 'tpu', **options).devices)
    except ImportError as e:
      raise ConfigError(f'Compiling for a TPU needs libtpu: pip install -e ".[tpu]" ({e})') \
          from None
    except Exception as e:  # pylint: disable=broad-except
      if 'libtpu' in str(e) or 'tpu' in str(e).lower():
        raise ConfigError(f'libtpu cannot make the {self.topology} topology: '
                          f'{str(e).splitlines()[0]}') from None
      raise
