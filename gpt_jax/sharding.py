"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallel with
parameters and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style sharding of
heads, MLP and vocabulary). The batch is split over `data` and `fsdp` together.
"""

import itertools
import math
from typing import Any, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from gpt_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axis (or axes, or None for replicated). Parameters use the plain
# names; activations use `batch`, `length` and the `act_*` names.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('position', None),
    ('norm', None),
    ('layers', None),  # the stacked-layer axis of scanned parameters
    ('lora_rank', None),  # the inner axis of LoRA adapters: small, replicated
    # activations
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def logical_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  """The default table with `config.mesh.rules` (a sequence of (name, axes) pairs) on top."""
  overrides = {name: _as_axes(axes) for name, axes in (mesh_config.get('rules') or ())}
  for name, axes in overrides.items():
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f'config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; '
                         f'mesh axes are {MESH_AXES}')
  table = dict(LOGICAL_RULES)
  table.update(overrides)
  return tuple(table.items())


def _as_axes(axes):
  if isinstance(axes, (list, tuple)):
    return tuple(axes)
  return axes


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh.{data,fsdp,tensor}; one of them may be -1 (all remaining devices)."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} '
                       f'devices) do not divide the {num_devices} available devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The `data` x `fsdp` x `tensor` mesh of config.mesh over `devices` (by default all).

  With `mesh.num_slices` > 1 (a multi-slice TPU job), `data` is split into an outer factor of
  num_slices over the slices, joined by the data-center network, and an inner one within each
  slice: `fsdp` and `tensor` stay inside a slice, so that only the gradients' reduction over
  `data` crosses slices.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: flax's logical constraints rely on GSPMD propagation (Explicit axes break them).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  num_slices = int(mesh_config.get('num_slices', 1))
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ConfigError(f'config.mesh: data ({shape[0]}) must be a multiple of '
                        f'mesh.num_slices ({num_slices}), the data-parallel axis over slices')
    try:
      grid = mesh_utils.create_hybrid_device_mesh(
          (shape[0] // num_slices,) + shape[1:], (num_slices, 1, 1), devices)
    except (ValueError, NotImplementedError, AttributeError) as e:
      raise ConfigError(f'config.mesh.num_slices={num_slices}: the devices do not form '
                        f'{num_slices} slices of a {shape} mesh ({e})') from None
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError as e:
    if 'physical mesh' not in str(e):
      raise
    raise ConfigError(_torus_mismatch(dict(zip(MESH_AXES, shape)), devices)) from None


def _torus_mismatch(sizes: dict[str, int], devices) -> str:
  """Why a mesh cannot be laid on a TPU torus, and the axis sizes that can."""
  torus = [max(d.coords[i] for d in devices) + 1 for i in range(len(devices[0].coords))]
  fitting = sorted({math.prod(subset) for n in range(len(torus) + 1)
                    for subset in itertools.combinations(torus, n)})
  return (f'config.mesh {sizes} cannot be laid on the {"x".join(map(str, torus))} torus of '
          f'{devices[0].device_kind}: each mesh axis must span whole torus axes, so its size '
          f'must be one of {fitting}')


def check_rules(logical_specs, rules) -> None:
  """Every logical name used by a parameter must have a rule: no silent replication."""
  known = {name for name, _ in rules}
  missing = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(
      logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
    for name in spec:
      for n in (name if isinstance(name, tuple) else (name,)):
        if n is not None and n not in known:
          missing.setdefault(n, jax.tree_util.keystr(path))
  if missing:
    detail = ', '.join(f'{n!r} (used by {p})' for n, p in missing.items())
    raise ConfigError(f'No sharding rule for logical axis {detail}; add it to '
                     'gpt_jax.sharding.LOGICAL_RULES or config.mesh.rules')


def check_divisible(abstract_tree, shardings) -> None:
  """Each sharded dimension must split evenly over its mesh axes (a clear error, not XLA's)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = math.prod(sharding.mesh.shape[a] for a in axes if a is not None)
      if dim % parts:
        raise ConfigError(
            f'{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}: dimension {dim} does '
            f'not divide over mesh axes {axes} of size {parts}; change the model dims or '
            'config.mesh')


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, length] token array."""
  return nn.logical_to_mesh_sharding(PartitionSpec('batch', 'length'), mesh, rules)


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s arrays held by one device (the first addressable one)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.addressable_shards[0]
    total += int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
  return total
