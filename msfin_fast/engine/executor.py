"""Running a plan: one executor, eagerly over an arena or functionally under ``torch.compile``.

Arena: the plan's kernel-written buffers are assigned to physical slots once (a slot is reused as
soon as every reader of its previous buffer has run; liveness does not depend on the shape), and
each input shape gets one tensor per slot, allocated on first use and kept in an LRU of shapes.
Layers run by PyTorch allocate their own outputs through its caching allocator and are dropped
after their last reader.

Both modes walk the same launches with the same ``Launch.run``: eagerly each launch writes into
the arena; functionally each kernel launch goes through one ``torch.library`` op (custom_op.py) that
allocates its outputs, so the compiler sees one graph and plans the memory itself.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import cuda_graphs
from . import plan as P


def _units(buf: P.Buf, itemsize: Fraction = Fraction(1)) -> Fraction:
    """A buffer's size in full-resolution pixel-channels of the arena's dtype (exact: H and W are
    multiples of 4); ``itemsize`` is its elements' size relative to the arena's (½: bf16 in fp32)."""
    return Fraction(buf.channels, buf.div * buf.div) * itemsize


@dataclass
class SlotAssignment:
    """Buffer id → slot index, each slot's capacity in full-resolution pixel-channels, and the
    index of the last launch that touches each buffer."""

    slot_of: dict[int, int]
    slots: list[Fraction]
    last_use: dict[int, int]
    bufs: dict[int, P.Buf]


def assign_slots(plan: P.Plan, itemsizes: dict | None = None) -> SlotAssignment:
    """Give every kernel-written buffer a slot that no live buffer holds (``itemsizes``: buffer →
    its elements' size relative to the arena's dtype, for buffers stored narrower).

    A slot is flat memory, so any buffer that fits may take it whatever its shape: best fit
    among the free slots, else the largest free slot grown to fit, else a new slot. (Keying slots
    by exact shape instead left the MSFIN arena at 14.75 full-resolution maps for a live peak of 8.)
    """
    last_use: dict[int, int] = {}
    bufs: dict[int, P.Buf] = {}
    for i, launch in enumerate(plan.launches):
        for buf in launch.reads() + launch.writes():
            last_use[buf.id] = i
            bufs[buf.id] = buf
    slot_of: dict[int, int] = {}
    slots: list[Fraction] = []
    free: list[int] = []
    for i, launch in enumerate(plan.launches):
        for buf in launch.writes():
            if not buf.kernel or buf.id in slot_of:
                continue
            need = _units(buf, (itemsizes or {}).get(buf, Fraction(1)))
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
        for buf in {b.id: b for b in launch.reads() + launch.writes()}.values():
            if buf.kernel and last_use[buf.id] == i:
                free.append(slot_of[buf.id])
    return SlotAssignment(slot_of, slots, last_use, bufs)


class Arena:
    """The tensors of one input shape: one flat tensor per slot, each buffer a view of the front of
    its slot, the channel sums of every pass, and the fused passes' scratch."""

    def __init__(self, plan: P.Plan, assignment: SlotAssignment, n: int, H: int, W: int,
                 dtype: torch.dtype, device: torch.device, scratch_numel: int = 0, dtypes: dict | None = None):
        self.scratch = torch.empty(scratch_numel, dtype=dtype, device=device) if scratch_numel else None
        # ceil: a slot sized in half elements (bf16 buffers in an fp32 arena) holds its last one
        self.tensors = [torch.empty(math.ceil(n * H * W * units), dtype=dtype, device=device)
                        for units in assignment.slots]
        self.values: dict = {}
        for buf_id, k in assignment.slot_of.items():
            buf = assignment.bufs[buf_id]
            shape = buf.shape(n, H, W)
            slot = self.tensors[k]
            own = (dtypes or {}).get(buf, dtype)
            if own != dtype:  # a narrower buffer: a view of the front of its slot in its own dtype
                slot = slot.view(own)
            self.values[buf] = slot[: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)
        total = sum(n * s.channels for s in plan.slots)
        self.program = None  # the backend's recorded calls over this arena, where it records them
        self.sums_flat = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for s in plan.slots:
            self.values[s] = self.sums_flat[offset: offset + n * s.channels].view(n, s.channels)
            offset += n * s.channels

    @property
    def nbytes(self) -> int:
        extra = self.scratch.numel() * self.scratch.element_size() if self.scratch is not None else 0
        return sum(t.numel() * t.element_size() for t in self.tensors) + self.sums_flat.numel() * 4 + extra

    def __getitem__(self, value) -> torch.Tensor:
        return self.values[value]


class Bindings:
    """The tensors of one run (or of one launch, under the custom op), by plan value: buffers,
    sums slots and the LR/SR images. ``operand`` binds a plan Source to its tensors and its producer's packed weights."""

    def __init__(self, packed: dict, bound: dict, scratch: torch.Tensor | None = None):
        self.packed = packed
        self.bound = bound
        self.local: dict = {}
        self.scratch = scratch

    def __getitem__(self, value) -> torch.Tensor:
        t = self.local.get(value)
        return t if t is not None else self.bound[value]

    def get(self, value) -> torch.Tensor | None:
        return None if value is None else self[value]

    def put(self, value, tensor: torch.Tensor) -> None:
        """An inline launch's result: copied into a preallocated output, else bound as it is."""
        target = self.local.get(value, self.bound.get(value))
        if target is None:
            self.local[value] = tensor
        else:
            target.copy_(tensor)

    def operand(self, ref: P.Source) -> P.Source:
        return ref.bind(self.__getitem__, self.packed[ref.producer] if ref.deferred else None)


class Executor:
    """Runs a plan with one backend over its packed weights (the backend's, plus the PyTorch
    modules of inline launches)."""

    def __init__(self, plan: P.Plan, backend, packed: dict, dtype: torch.dtype, scale: int = 4,
                 addend_dtype: torch.dtype | None = None):
        self.plan = plan
        self.backend = backend
        self.packed = packed
        self.dtype = dtype
        self.scale = scale
        # Buffers stored in another dtype than ``dtype``: those read only as addends, where the
        # backend keeps them narrower (``addend_dtype``, e.g. bf16 beside an fp32 residual stream).
        self.dtypes: dict = {}
        if addend_dtype is not None and addend_dtype != dtype:
            self.dtypes = {buf: addend_dtype for buf in P.addend_buffers(plan)}
        self.assignment = assign_slots(plan, {buf: Fraction(d.itemsize, dtype.itemsize) for buf, d in self.dtypes.items()})
        self.all_kernels = not any(launch.inline for launch in plan.launches)  # nothing run by PyTorch
        self.last_use = self.assignment.last_use

    def _scratch(self, launch: P.Launch, n: int, H: int, W: int, device: torch.device) -> int:
        """Scratch elements the fused pass ``launch`` needs at full resolution N×H×W."""
        t = launch.src.t
        return self.backend.scratch_numel(device, t.channels, n, H // t.div, W // t.div)

    def scratch_numel(self, n: int, H: int, W: int, device: torch.device) -> int:
        """The largest scratch any fused pass needs at this shape (one buffer serves them all)."""
        return max((self._scratch(launch, n, H, W, device) for launch in self.plan.fused_passes), default=0)

    def arena(self, n: int, H: int, W: int, device: torch.device) -> Arena:
        """A new arena for output size N×H×W. It outlives the call that asks for it, so it is made
        outside inference mode: made inside, its tensors would be inference tensors, and a later
        call outside inference mode could not zero or fill them in place."""
        with torch.inference_mode(False):
            return Arena(self.plan, self.assignment, n, H, W, self.dtype, device,
                         self.scratch_numel(n, H, W, device), self.dtypes)

    def _release(self, t: Bindings, i: int, launch: P.Launch) -> None:
        for buf in launch.reads():
            if not buf.kernel and self.last_use[buf.id] == i:
                t.local.pop(buf, None)

    def run(self, x: torch.Tensor, arena: Arena, out: torch.Tensor) -> torch.Tensor:
        """Eagerly: ``x`` LR NCHW contiguous in the engine dtype; ``out`` [N, 3, H, W] NCHW, written."""
        cuda_graphs.hold(self, arena)  # a CUDA graph captured around this call replays into both
        arena.sums_flat.zero_()
        # A backend that records its calls (native) replays them from the arena's second run on:
        # the same calls over the same tensors, without the Python of the launches in between.
        records = self.all_kernels and getattr(self.backend, "records_calls", False)
        if records and arena.program is not None and self.backend.replay(arena.program, x, out):
            return out
        with self.backend.recording(x, out) if records else contextlib.nullcontext() as program:
            t = Bindings(self.packed, arena.values, arena.scratch)
            t.local[P.LR], t.local[P.SR] = x, out
            for i, launch in enumerate(self.plan.launches):
                launch.run(self.backend, self.packed, t)
                self._release(t, i, launch)
        if records:
            arena.program = program
        return out

    def run_functional(self, x: torch.Tensor, key: int, record: list | None = None) -> torch.Tensor:
        """The path ``torch.compile`` traces: every kernel launch through ``custom_op.launch`` (which
        allocates its outputs); inline launches as plain PyTorch. ``key`` is this executor's entry
        in the op's registry; ``record`` collects (index, inputs) of each op call (for tests)."""
        from . import custom_op

        t = Bindings(self.packed, {})
        t.local[P.LR] = x
        for i, launch in enumerate(self.plan.launches):
            if launch.inline:
                launch.run(self.backend, self.packed, t)
            else:
                inputs = [t[v] for v in launch.inputs()]
                if record is not None:
                    record.append((i, inputs))
                t.local.update(zip(launch.outputs(), custom_op.launch(key, i, inputs)))
            self._release(t, i, launch)
        return t[P.SR]

    # One launch under the custom op ----------------------------------------------------------

    def _dims(self, launch: P.Launch, first: torch.Tensor) -> tuple[int, int, int]:
        """(N, H, W) at full resolution, from a launch's first input."""
        value = launch.inputs()[0]
        if value == P.LR:
            n, _, h, w = first.shape
            return n, self.scale * h, self.scale * w
        n, h, w, _ = first.shape
        return n, h * value.div, w * value.div

    def allocate(self, index: int, inputs: list[torch.Tensor]) -> tuple[P.Launch, dict, torch.Tensor | None]:
        """Fresh outputs and temporaries for launch ``index`` (shapes from the plan)."""
        launch = self.plan.launches[index]
        n, H, W = self._dims(launch, inputs[0])
        device = inputs[0].device
        made = {}
        for value in launch.outputs() + launch.temps():
            if value == P.SR:
                made[value] = torch.empty(n, 3, H, W, dtype=self.dtype, device=device)
            elif isinstance(value, P.SumsSlot):
                made[value] = torch.zeros(value.shape(n, H, W), dtype=torch.float32, device=device)
            else:
                made[value] = torch.empty(value.shape(n, H, W), dtype=self.dtypes.get(value, self.dtype), device=device)
        numel = self._scratch(launch, n, H, W, device) if launch.fused else 0
        scratch = torch.empty(numel, dtype=self.dtype, device=device) if numel else None
        return launch, made, scratch

    def launch(self, index: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run launch ``index`` on ``inputs`` into fresh outputs (the custom op's implementation)."""
        launch, made, scratch = self.allocate(index, inputs)
        t = Bindings(self.packed, {**dict(zip(launch.inputs(), inputs)), **made}, scratch)
        launch.run(self.backend, self.packed, t)
        return [made[v] for v in launch.outputs()]


