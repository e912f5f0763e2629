"""Running a plan: an arena of activations per input shape, optional CUDA graphs per shape.

Arena: the plan's kernel-written buffers are assigned to physical slots once (a slot is reused as
soon as every reader of its previous buffer has run; liveness does not depend on the shape), and
each input shape gets one tensor per slot, allocated on first use and kept in an LRU of shapes.
Layers run by PyTorch allocate their own outputs through its caching allocator and are dropped
after their last reader.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ..kernels.contract import Source
from . import plan as P


def _units(buf: P.Buf) -> Fraction:
    """A buffer's size in full-resolution pixel-channels (exact: H and W are multiples of 4)."""
    return Fraction(buf.channels, buf.div * buf.div)


@dataclass
class SlotAssignment:
    """Buffer id → slot index, each slot's capacity in full-resolution pixel-channels, and the
    index of the last launch that touches each buffer."""

    slot_of: dict[int, int]
    slots: list[Fraction]
    last_use: dict[int, int]
    bufs: dict[int, P.Buf]


def assign_slots(plan: P.Plan) -> SlotAssignment:
    """Give every kernel-written buffer a slot that no live buffer holds.

    A slot is flat memory, so any buffer that fits may take it whatever its shape: best fit
    among the free slots, else the largest free slot grown to fit, else a new slot. (Keying slots
    by exact shape instead left the MSFIN arena at 14.75 full-resolution maps for a live peak of 8.)
    """
    last_use: dict[int, int] = {}
    bufs: dict[int, P.Buf] = {}
    for i, launch in enumerate(plan.launches):
        for buf in P.reads(launch) + P.writes(launch):
            last_use[buf.id] = i
            bufs[buf.id] = buf
    slot_of: dict[int, int] = {}
    slots: list[Fraction] = []
    free: list[int] = []
    for i, launch in enumerate(plan.launches):
        for buf in P.writes(launch):
            if not buf.kernel or buf.id in slot_of:
                continue
            need = _units(buf)
            fitting = [k for k in free if slots[k] >= need]
            if fitting:
                k = min(fitting, key=lambda k: slots[k])
            elif free:
                k = max(free, key=lambda k: slots[k])
                slots[k] = need
            else:
                k = len(slots)
                slots.append(need)
            if k in free:
                free.remove(k)
            slot_of[buf.id] = k
        for buf in {b.id: b for b in P.reads(launch) + P.writes(launch)}.values():
            if buf.kernel and last_use[buf.id] == i:
                free.append(slot_of[buf.id])
    return SlotAssignment(slot_of, slots, last_use, bufs)


class Arena:
    """The tensors of one input shape: one flat tensor per slot, each buffer a view of the front of
    its slot, plus the channel sums of every pass."""

    def __init__(self, plan: P.Plan, assignment: SlotAssignment, n: int, H: int, W: int,
                 dtype: torch.dtype, device: torch.device, scratch_numel: int = 0):
        # Per-program scratch of the fused RRCAB kernel, sized for the pass that needs the most.
        self.scratch = torch.empty(scratch_numel, dtype=dtype, device=device) if scratch_numel else None
        self.tensors = [torch.empty(int(n * H * W * units), dtype=dtype, device=device) for units in assignment.slots]
        self.views: dict[int, torch.Tensor] = {}
        for buf_id, k in assignment.slot_of.items():
            buf = assignment.bufs[buf_id]
            shape = (n, H // buf.div, W // buf.div, buf.channels)
            self.views[buf_id] = self.tensors[k][: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)
        total = sum(n * s.channels for s in plan.slots)
        self.sums_flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.sums = []
        offset = 0
        for s in plan.slots:
            self.sums.append(self.sums_flat[offset: offset + n * s.channels].view(n, s.channels))
            offset += n * s.channels

    @property
    def nbytes(self) -> int:
        extra = self.scratch.numel() * self.scratch.element_size() if self.scratch is not None else 0
        return sum(t.numel() * t.element_size() for t in self.tensors) + self.sums_flat.numel() * 4 + extra

    def __getitem__(self, buf: P.Buf) -> torch.Tensor:
        return self.views[buf.id]


class Runner:
    """Executes a plan with one kernel backend; layers without kernels run as PyTorch modules."""

    def __init__(self, plan: P.Plan, ops, packed: dict, layers: dict[str, nn.Module], keys: dict[str, int]):
        self.plan = plan
        self.ops = ops
        self.packed = packed
        self.layers = layers
        self.keys = keys  # registry keys of the packed weights, for the torch.library ops
        self.assignment = assign_slots(plan)
        self.last_use = self.assignment.last_use

    def arena(self, n: int, H: int, W: int, dtype: torch.dtype, device: torch.device) -> Arena:
        scratch = 0
        if self.plan.fused_rrcab and hasattr(self.ops, "scratch_numel"):
            scratch = max(
                self.ops.scratch_numel(device, launch.src.t.channels, n, H // launch.src.t.div, W // launch.src.t.div)
                for launch in self.plan.launches if isinstance(launch, P.RRCABPass) and launch.fused
            )
        return Arena(self.plan, self.assignment, n, H, W, dtype, device, scratch)

    def run(self, x: torch.Tensor, arena: Arena, out: torch.Tensor) -> torch.Tensor:
        """``x``: LR NCHW contiguous in the engine dtype; ``out``: [N, 3, H, W] NCHW, written."""
        env: dict[int, torch.Tensor] = {}

        def tensor(buf: P.Buf | None) -> torch.Tensor | None:
            if buf is None:
                return None
            return arena[buf] if buf.kernel else env[buf.id]

        def source(ref: P.SourceRef) -> Source:
            ca = self.packed[ref.block].ca if ref.u is not None else None
            sums = arena.sums[ref.sums.id] if ref.sums is not None else None
            return Source(tensor(ref.t), tensor(ref.u), sums, ca, tensor(ref.e1), tensor(ref.e2))

        arena.sums_flat.zero_()
        for i, launch in enumerate(self.plan.launches):
            if isinstance(launch, P.RRCABPass):
                a = arena.scratch if launch.fused else tensor(launch.a)
                self.ops.rrcab_pass(source(launch.src), self.packed[launch.block], tensor(launch.x_out),
                                    a, tensor(launch.u), arena.sums[launch.sums.id], fused=launch.fused)
            elif isinstance(launch, P.Head):
                self.ops.head(x, self.packed["head"], tensor(launch.out))
            elif isinstance(launch, P.Materialize):
                self.ops.materialize(source(launch.src), tensor(launch.out))
            elif isinstance(launch, P.Conv):
                inputs = source(launch.src) if launch.src is not None else [tensor(b) for b in launch.inputs]
                self.ops.conv(inputs, self.packed[launch.module], tensor(launch.out), launch)
            elif isinstance(launch, P.Layer):
                env[launch.out.id] = self.layer(launch, [tensor(b) for b in launch.inputs])
            elif isinstance(launch, P.Tail):
                self.ops.tail(source(launch.src), self.packed["tail"], out)
            for buf in P.reads(launch):
                if not buf.kernel and self.last_use[buf.id] == i:
                    env.pop(buf.id, None)
        return out


    def layer(self, launch: P.Layer, inputs: list[torch.Tensor]) -> torch.Tensor:
        nchw = [t.permute(0, 3, 1, 2) for t in inputs]  # channels_last views of the NHWC buffers
        y = self.layers[launch.module](nchw[0] if len(nchw) == 1 else torch.cat(nchw, dim=1))
        return y.permute(0, 2, 3, 1).contiguous()

    def run_functional(self, x: torch.Tensor) -> torch.Tensor:
        """The same launches through the ``torch.library`` ops, each allocating its outputs.

        This is the path ``torch.compile`` traces: no arena, no Python-side buffer reuse, one
        graph from input to output.
        """
        from . import ops

        env: dict[int, torch.Tensor] = {}
        sums: dict[int, torch.Tensor] = {}

        def args(ref: P.SourceRef):
            get = lambda b: env[b.id] if b is not None else None  # noqa: E731
            return (get(ref.t), get(ref.u), sums[ref.sums.id] if ref.sums is not None else None, get(ref.e1),
                    get(ref.e2), self.keys[ref.block] if ref.u is not None else -1)

        for launch in self.plan.launches:
            if isinstance(launch, P.RRCABPass):
                x_out, u, s = ops.rrcab_pass(*args(launch.src), self.keys[launch.block], launch.x_out is not None)
                if launch.x_out is not None:
                    env[launch.x_out.id] = x_out
                env[launch.u.id] = u
                sums[launch.sums.id] = s
            elif isinstance(launch, P.Head):
                env[launch.out.id] = ops.head(x, self.keys["head"])
            elif isinstance(launch, P.Materialize):
                env[launch.out.id] = ops.materialize(*args(launch.src), self.keys["ops"])
            elif isinstance(launch, P.Conv):
                if launch.src is not None:
                    t, u, s, e1, e2, ca_key = args(launch.src)
                    inputs = [t]
                else:
                    inputs, u, s, e1, e2, ca_key = [env[b.id] for b in launch.inputs], None, None, None, None, -1
                env[launch.out.id] = ops.conv(inputs, u, s, e1, e2, ca_key, self.keys[launch.module],
                                              launch.ksize, launch.stride, launch.leaky, launch.shuffle)
            elif isinstance(launch, P.Layer):
                env[launch.out.id] = self.layer(launch, [env[b.id] for b in launch.inputs])
            elif isinstance(launch, P.Tail):
                return ops.tail(*args(launch.src), self.keys["tail"])
        raise RuntimeError("plan has no tail")


class ShapeCache:
    """Per-input-shape state (arenas, captured CUDA graphs), least recently used dropped beyond
    ``capacity``: a service that sees many sizes keeps a bounded number of them alive."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def values(self):
        return self.entries.values()

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
