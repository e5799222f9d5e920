"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallel with
parameters and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style sharding of
heads, MLP and vocabulary). The batch is split over `data` and `fsdp` together.
"""

import contextlib
import dataclasses
import itertools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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
    ('act_kv_heads', 'tensor'),  # the KV cache's heads
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


def abstract_params(model: nn.Module, seq_len: int, mesh: Mesh, rules):
  """The parameters' abstract arrays, each with the sharding its logical names give."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len),
                                                                         jnp.int32))['params'])
  shardings = logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  # Unboxed without a sharding constraint, which would need concrete arrays under a mesh.
  unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False), boxed,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      unboxed, shardings)


# ------------------------------------------------------------------ inference


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the rules table: where an inference program's arrays live.

  Programs are traced under `activate()`, so that the model's logical constraints (batch over
  data x fsdp, heads over tensor) place activations and the KV cache. A batch is padded to a
  multiple of `batch_shards` rows.
  """
  mesh: Mesh
  rules: tuple

  @property
  def batch_shards(self) -> int:
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def activate(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def sharding(self, *logical_names) -> NamedSharding:
    return nn.logical_to_mesh_sharding(PartitionSpec(*logical_names), self.mesh, self.rules)

  def unsplit_batch(self) -> 'Placement':
    """The same mesh with the batch replicated: for a program on a single row."""
    return Placement(self.mesh, tuple((name, None if name == 'batch' else axes)
                                      for name, axes in self.rules))

  def rows(self, n: int) -> int:
    """n rounded up to a multiple of the batch shards."""
    return -(-n // self.batch_shards) * self.batch_shards


def parse_mesh(text: str) -> dict[str, int]:
  """'DxFxT' (data x fsdp x tensor sizes, one may be -1) -> {'data': D, 'fsdp': F, ...}."""
  if not re.fullmatch(r'(-1|\d+)x(-1|\d+)x(-1|\d+)', text.strip()):
    raise ConfigError(f'--mesh must be DATAxFSDPxTENSOR sizes such as 1x1x8 or -1x1x2, got '
                      f'{text!r}')
  return dict(zip(MESH_AXES, (int(n) for n in text.strip().split('x'))))


def inference_placement(mesh_flag: str, mesh_config, devices=None) -> Placement:
  """The Placement `--mesh` asks for (fixed sizes whose product is below the device count take
  the first devices); without it, the training config's mesh where it fits the devices, else
  every device on data."""
  devices = list(devices if devices is not None else jax.devices())
  rules = logical_rules(mesh_config)
  if mesh_flag:
    sizes = parse_mesh(mesh_flag)
    if -1 not in sizes.values():
      devices = devices[:math.prod(sizes.values())]
    try:
      shape = mesh_shape(sizes, len(devices))
    except ConfigError as e:
      raise ConfigError(str(e).replace('config.mesh', f'--mesh={mesh_flag}')) from None
  else:
    try:
      shape = mesh_shape(mesh_config, len(devices))
    except ConfigError:
      shape = (len(devices), 1, 1)
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
  return Placement(mesh, rules)


def check_heads_fit(num_heads: int, kv_heads: int, placement: Placement) -> None:
  """A one-line error when attention heads do not split over the tensor axis."""
  tensor = placement.mesh.shape['tensor']
  for count, what in ((kv_heads, 'key/value heads'), (num_heads, 'attention heads')):
    if count % tensor:
      raise ConfigError(f'The model\'s {count} {what} do not divide over tensor={tensor} '
                        f'devices: choose a --mesh whose tensor size divides {count}')


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s arrays held by one device (the first addressable one)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.addressable_shards[0]
    total += int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
  return total
