"""What a compiled program's optimized HLO holds: its collectives and its HBM traffic, per run.

XLA prints each computation of a module as a block. A `while` loop's body runs its trip count
(XLA's `known_trip_count`, else the bound its condition compares with) times: a collective in
a scan over the layers counts once per layer. XLA's own cost analysis counts a loop's body once,
which is why these are counted here. Calls count once; every branch of a conditional counts
(an upper bound: a run takes one).
"""

import collections
import dataclasses
import math
import re

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2,
          'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}
_HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) \((.*)\) -> .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_CALLED = re.compile(r'\b(body|calls|to_apply|branch_computations|true_computation|'
                     r'false_computation)=\{?([%\w.\-, ]+)\}?')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DCN_KIND = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
# Instructions that move no data of their own.
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
         'partition-id', 'replica-id', 'iota', 'opt-barrier', 'add-dependency', 'domain'}


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: float = 0.0   # the full (unsharded) buffer of each, summed over the run


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  op: str
  operands: list[str]
  line: str
  root: bool


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape ('bf16[8,128]{1,0}', or a tuple of them)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _BYTES:
      sizes.append(_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d))
  return sizes


class Module:
  """An optimized HLO module's computations (compiled.as_text())."""

  def __init__(self, text: str):
    self.computations: dict[str, list[_Instruction]] = {}
    self.entry = None
    name = None
    for line in text.splitlines():
      header = _HEADER.match(line)
      if header and not line.startswith(' '):
        name = header.group(2)
        self.computations[name] = []
        self.entry = name if header.group(1) else self.entry
      elif name is not None and line.strip() == '}':
        name = None
      elif name is not None:
        found = _INSTRUCTION.match(line)
        if found:
          operands = re.findall(r'%([\w.\-]+)', found.group(5).split(')')[0])
          self.computations[name].append(_Instruction(found.group(2), found.group(3),
                                                      found.group(4), operands, line,
                                                      bool(found.group(1))))

  def _callees(self, instruction: _Instruction) -> list[tuple[str, str]]:
    return [(kind, callee.strip()) for kind, names in _CALLED.findall(instruction.line)
            for callee in names.replace('%', '').split(',')
            if callee.strip() in self.computations]

  def _trip_count(self, instruction: _Instruction) -> int:
    known = _TRIP_COUNT.search(instruction.line)
    if known:
      return int(known.group(1))
    condition = re.search(r'condition=%?([\w.\-]+)', instruction.line)
    bounds = [int(c) for i in self.computations.get(condition.group(1) if condition else '', [])
              if i.op == 'constant' for c in re.findall(r'constant\((\d+)\)', i.line)]
    return max(bounds, default=1)

  def _walk(self, name: str, visit, times: int = 1, seen: tuple = ()) -> None:
    """visit(instruction, computation, times) for the instructions a run executes, through
    loops (times their trip count), calls and conditionals (every branch), but not into
    fusions or reductions."""
    for instruction in self.computations.get(name, ()):
      if instruction.op in ('while', 'call', 'conditional'):
        repeat = self._trip_count(instruction) if instruction.op == 'while' else 1
        for _, callee in self._callees(instruction):
          if callee not in seen:
            self._walk(callee, visit, times * repeat, seen + (name,))
      else:
        visit(instruction, name, times)

  def collectives(self) -> dict[str, Collective]:
    """{op: Collective} per run. Asynchronous pairs (all-gather-start / -done) count once; a
    collective's bytes are its whole buffers (an all-gather's output, a reduce-scatter's input,
    every array of a combined all-reduce). TPU's reduce-scatter fusions (an all-reduce and a
    slice) count as reduce-scatters."""
    found = collections.defaultdict(Collective)

    def visit(instruction, _, times):
      op = instruction.op
      base = op[:-len('-start')] if op.endswith('-start') else op
      callees = [c for _, c in self._callees(instruction)]
      if op == 'fusion' and any(c.startswith('all-reduce-scatter') for c in callees):
        base = 'reduce-scatter'
        sizes = [max(array_bytes(i.shape), default=0) for c in callees
                 for i in self.computations[c] if i.op == 'parameter']
      elif op in ('fusion', 'async-start') and base not in COLLECTIVES:
        for c in callees:  # collectives wrapped in async or fused computations
          for inner in self.computations[c]:
            if inner.op in COLLECTIVES:
              found[inner.op].count += times
              found[inner.op].bytes += times * sum(array_bytes(inner.shape))
        return
      elif op.endswith('-start') and base in ('all-gather', 'collective-permute'):
        sizes = [max(array_bytes(instruction.shape), default=0)]  # (operands, outputs): outputs
      else:
        sizes = array_bytes(instruction.shape)  # a combined collective's outputs: all of them
      if base in COLLECTIVES:
        found[base].count += times
        found[base].bytes += times * sum(sizes)

    self._walk(self.entry, visit)
    return dict(found)

  def hbm_bytes(self) -> float:
    """Bytes read and written in HBM per run: each executed instruction's operands and outputs
    (a fusion's, not its insides'). A slice read from a larger operand counts the slice; an
    update written in place into a buffer counts the update."""
    shapes = {i.name: i.shape for instructions in self.computations.values()
              for i in instructions}
    total = 0.0

    def visit(instruction, _, times):
      nonlocal total
      if instruction.op in _FREE or instruction.op.endswith('-done'):
        return
      operand_bytes = [sum(array_bytes(shapes.get(o, ''))) for o in instruction.operands]
      output_bytes = sum(array_bytes(instruction.shape))
      fused = self.computations.get(next((c for k, c in self._callees(instruction)
                                          if k == 'calls'), ''), [])
      ops = {i.op for i in fused} | {instruction.op}
      if 'dynamic-update-slice' in ops and operand_bytes and max(operand_bytes) == output_bytes:
        in_place = operand_bytes.index(output_bytes)
        update = sum(b for i, b in enumerate(operand_bytes) if i != in_place)
        total += times * 2 * update
        return
      if 'dynamic-slice' in ops or instruction.op == 'slice':
        operand_bytes = [min(b, output_bytes) for b in operand_bytes]
      total += times * (sum(operand_bytes) + output_bytes)

    self._walk(self.entry, visit)
    return total

  def largest_arrays(self, n: int = 8) -> list[tuple[str, int, int]]:
    """(shape, bytes, instructions producing it) of the `n` largest array shapes the program
    produces: where its memory goes (e.g. a batch-wide activation held on every chip)."""
    found = collections.Counter()
    sizes = {}
    for instructions in self.computations.values():
      for i in instructions:
        if i.op in _FREE and i.op != 'parameter':
          continue
        for dtype, dims in _ARRAY.findall(i.shape):
          if dtype in _BYTES:
            key = f'{dtype}[{dims}]'
            found[key] += 1
            sizes[key] = _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
    return [(key, sizes[key], found[key])
            for key in sorted(found, key=lambda k: -sizes[k])[:n]]

  def dcn_collectives(self) -> dict[str, Collective]:
    """The collectives across slices, per run: a multi-slice program hands them to the
    data-center network as host transfers (`send`s tagged with the collective's kind), each
    counted once with the bytes it sends."""
    found = collections.defaultdict(Collective)

    def visit(instruction, _, times):
      kind = _DCN_KIND.search(instruction.line)
      if instruction.op == 'send' and kind:
        op = kind.group(1).lower().replace('_', '-')
        found[op].count += times
        found[op].bytes += times * max(array_bytes(instruction.shape), default=0)

    self._walk(self.entry, visit)
    return dict(found)
