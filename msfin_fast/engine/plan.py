"""From the reference graph to a list of launches over symbolic buffers.

The plan walks ``graph.trace_features(model)`` node by node; it never restates the network.
Values flow between nodes in one of three forms:

``Plain``     a finished NHWC buffer.
``Deferred``  an RRCAB result ``t + CA(u)``: buffers ``t`` and ``u`` plus a slot of channel sums.
              Nothing finishes it until a reader needs it, and most readers finish it for free.
``Sum``       a ``+`` node over a Plain/Deferred base and up to two Plain addends; it too is
              finished by its reader.

An RRCAB pass reads its input as a deferred Source and, when that input is not already a plain
buffer, writes the finished input as its residual base (``x_out``); that write doubles as the
materialised value for any other reader of the same node. Only values read by a layer without a
deferred prologue (a cuDNN conv, a concat) and not finished that way get a ``materialize`` launch.

Buffers are symbolic — (resolution divisor, channels) — so one plan serves every input shape;
``executor.Arena`` turns them into tensors per shape and reuses them once dead. Launches carry
every decision the executor needs (what they read and write, fused or not, which weights).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..trace import trace_features
from ..model import MSFIN, RRCAB, Down2, Down4, Up2
from .source import Source


@dataclass(frozen=True)
class Buf:
    """An NHWC activation [N, H/div, W/div, channels]; ``kernel`` buffers live in the arena."""

    id: int
    div: int
    channels: int
    kernel: bool = True

    def shape(self, n: int, H: int, W: int) -> tuple[int, ...]:
        return (n, H // self.div, W // self.div, self.channels)


@dataclass(frozen=True)
class SumsSlot:
    """Channel sums [N, channels] fp32 of one RRCAB pass."""

    id: int
    channels: int

    def shape(self, n: int, H: int, W: int) -> tuple[int, ...]:
        return (n, self.channels)


@dataclass
class Plain:
    buf: Buf


@dataclass
class Deferred:
    t: Buf
    u: Buf
    sums: SumsSlot
    block: str
    plain: Buf | None = None  # set once some launch has written the finished value


@dataclass
class Sum:
    base: "Plain | Deferred"
    addends: list[Buf]
    plain: Buf | None = None


Value = Plain | Deferred | Sum


# Launches -------------------------------------------------------------------------------------
#
# Every launch says what it reads (``inputs``), what it writes and hands on (``outputs``), what it
# writes only for itself (``temps``), which packed weights it uses (``weights``) and how it runs
# (``run``, given the backend, the packed weights and a ``Bindings`` view that maps each of those
# values to a tensor). The executor only ever calls these; it never asks what kind a launch is.


@dataclass(frozen=True)
class Image:
    """The network's LR input (``name="lr"``, NCHW) or its SR output (``name="sr"``, NCHW)."""

    name: str


LR, SR = Image("lr"), Image("sr")


def _source_values(src: Source) -> list:
    return src.parts + ([src.sums] if src.sums is not None else [])


class Launch:
    """Base of the plan's launches. ``inline`` launches are plain PyTorch: under ``torch.compile``
    they are traced as they are instead of going through the engine's custom op."""

    inline = False
    fused = False
    movable = False  # a pure function of its inputs that may run anywhere before its first reader
    weights: str | None = None

    def inputs(self) -> list:
        return []

    def outputs(self) -> list:
        return []

    def temps(self) -> list:
        return []

    def run(self, backend, packed, t) -> None:
        raise NotImplementedError

    def torch_weights(self, model: nn.Module, dtype: torch.dtype) -> nn.Module | None:
        """The PyTorch module an inline launch runs (packed by the engine, not the backend)."""
        return None

    def reads(self) -> list[Buf]:
        """The activation buffers this launch reads (its own temporaries included)."""
        return [v for v in self.inputs() + self.temps() if isinstance(v, Buf)]

    def writes(self) -> list[Buf]:
        return [v for v in self.outputs() + self.temps() if isinstance(v, Buf)]


@dataclass
class Head(Launch):
    """Bilinear ×S, sub_mean and the head conv: the LR image → the first features."""

    out: Buf
    weights = "head"

    def inputs(self):
        return [LR]

    def outputs(self):
        return [self.out]

    def run(self, backend, packed, t):
        backend.head(t[LR], packed["head"], t[self.out])


@dataclass
class RRCABPass(Launch):
    block: str
    src: Source
    x_out: Buf | None
    a: Buf | None  # conv1's output; None when the pass is one launch that keeps it on chip
    u: Buf
    sums: SumsSlot

    @property
    def fused(self) -> bool:
        return self.a is None

    @property
    def weights(self) -> str:
        return self.block

    def inputs(self):
        return _source_values(self.src)

    def outputs(self):
        return [b for b in (self.x_out, self.u, self.sums) if b is not None]

    def temps(self):
        return [self.a] if self.a is not None else []

    def run(self, backend, packed, t):
        a = t.scratch if self.fused else t[self.a]
        backend.rrcab_pass(t.operand(self.src), packed[self.block], t.get(self.x_out), a, t[self.u],
                           t[self.sums], fused=self.fused)


@dataclass
class Materialize(Launch):
    src: Source
    out: Buf

    def inputs(self):
        return _source_values(self.src)

    def outputs(self):
        return [self.out]

    def run(self, backend, packed, t):
        backend.materialize(t.operand(self.src), t[self.out])


@dataclass
class Layer(Launch):
    """A reference layer run by PyTorch (cuDNN on a GPU) on NHWC buffers; several inputs are concatenated."""

    module: str
    parts: list[Buf]
    out: Buf
    inline = True
    movable = True

    @property
    def weights(self) -> str:
        return self.module

    def value_inputs(self) -> list[Buf]:
        return list(self.parts)

    def inputs(self):
        return list(self.parts)

    def outputs(self):
        return [self.out]

    def torch_weights(self, model, dtype):
        return copy.deepcopy(model.get_submodule(self.module)).to(dtype=dtype, memory_format=torch.channels_last).eval()

    def run(self, backend, packed, t):
        nchw = [t[b].permute(0, 3, 1, 2) for b in self.parts]  # channels_last views of the NHWC buffers
        y = packed[self.module](nchw[0] if len(nchw) == 1 else torch.cat(nchw, dim=1))
        t.put(self.out, y.permute(0, 2, 3, 1).contiguous())


@dataclass
class Conv(Launch):
    """One dense conv of a layer, run by the backend (``module`` is the conv's qualified name)."""

    module: str
    parts: list[Buf]  # the plain inputs (several: a concatenation read as separate inputs)
    out: Buf | None
    ksize: int
    stride: int
    leaky: bool = False
    shuffle: bool = False
    src: Source | None = None  # a single deferred input, finished by the conv as it loads
    movable = True

    @property
    def weights(self) -> str:
        return self.module

    def value_inputs(self) -> list[Buf]:
        return [self.src.t] if self.src is not None else list(self.parts)

    def inputs(self):
        return _source_values(self.src) if self.src is not None else list(self.parts)

    def outputs(self):
        return [self.out]

    def run(self, backend, packed, t):
        inputs = t.operand(self.src) if self.src is not None else [t[b] for b in self.parts]
        backend.conv(inputs, packed[self.module], t[self.out], self)


@dataclass
class Tail(Launch):
    """The tail conv with add_mean folded in: the last features → the SR image."""

    src: Source
    weights = "tail"

    def inputs(self):
        return _source_values(self.src)

    def outputs(self):
        return [SR]

    def run(self, backend, packed, t):
        backend.tail(t.operand(self.src), packed["tail"], t[SR])


@dataclass
class Network(Launch):
    """The whole network as one PyTorch module (the ``reference`` and ``cpu`` backends)."""

    weights = "network"
    inline = True

    def inputs(self):
        return [LR]

    def outputs(self):
        return [SR]

    def run(self, backend, packed, t):
        t.put(SR, backend.network(t[LR], packed["network"]))


def lower(name: str, module: nn.Module) -> list[Conv]:
    """The dense convs a non-RRCAB layer consists of, in order, with their epilogues.

    Only structures known to be sequential are lowered (Sequential, and the model's Down2 /
    Down4 / Up2, whose forwards apply their children in order); anything else stays a PyTorch layer.
    """
    if isinstance(module, Down2):
        return lower(f"{name}.down", module.down)
    if isinstance(module, Down4):
        return lower(f"{name}.down1", module.down1) + lower(f"{name}.down2", module.down2)
    if isinstance(module, Up2):
        return lower(f"{name}.up", module.up)
    if isinstance(module, nn.Sequential):
        steps: list[Conv] = []
        for child_name, child in module.named_children():
            if isinstance(child, nn.LeakyReLU) and child.negative_slope == 0.2 and steps and not steps[-1].leaky:
                steps[-1].leaky = True
            elif isinstance(child, nn.PixelShuffle) and child.upscale_factor == 2 and steps and not steps[-1].shuffle:
                steps[-1].shuffle = True
            else:
                steps += lower(f"{name}.{child_name}", child)
        return steps
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0]
        if (module.kernel_size != (k, k) or k not in (1, 3) or module.padding != (k // 2, k // 2)
                or module.groups != 1 or module.dilation != (1, 1) or module.stride[0] not in (1, 2)
                or module.stride[0] != module.stride[1] or module.padding_mode != "zeros"):
            raise UnsupportedModel(f"{name}: conv {module} has no kernel")
        return [Conv(name, [], None, k, module.stride[0])]
    if isinstance(module, nn.ConvTranspose2d):
        if (module.kernel_size != (2, 2) or module.stride != (2, 2) or module.padding != (0, 0)
                or module.output_padding != (0, 0) or module.groups != 1 or module.dilation != (1, 1)):
            raise UnsupportedModel(f"{name}: transposed conv {module} has no kernel")
        return [Conv(name, [], None, 1, 1, shuffle=True)]
    raise UnsupportedModel(f"{name}: {type(module).__name__} has no kernel")


@dataclass
class Plan:
    """The launches of one forward, in order, and the channel-sum slots their passes fill."""

    launches: list[Launch] = field(default_factory=list)
    slots: list[SumsSlot] = field(default_factory=list)

    @property
    def fused_passes(self) -> list[RRCABPass]:
        return [launch for launch in self.launches if launch.fused]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for launch in self.launches:
            out[type(launch).__name__] = out.get(type(launch).__name__, 0) + 1
        return out


class UnsupportedModel(ValueError):
    """The model has a shape the kernels do not cover; the engine falls back to the reference."""


def _out_shape(module: nn.Module, div: int, channels_in: int) -> tuple[int, int]:
    """Output divisor and channels of ``module``, found by running it on a meta tensor."""
    size = 16 * div
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    probe = torch.empty(1, channels_in, size // div, size // div, device="meta")
    out = torch.func.functional_call(module, meta, (probe,))
    if out.dim() != 4 or size % out.shape[-1]:
        raise UnsupportedModel(f"{type(module).__name__} maps {tuple(probe.shape)} to {tuple(out.shape)}")
    return size // out.shape[-1], out.shape[1]


class Planner:
    def __init__(self, model: MSFIN, conv_kernels: bool = True, fused_max_channels: int = 0):
        self.model = model
        self.conv_kernels = conv_kernels
        self.fused_max_channels = fused_max_channels
        self.plan = Plan()
        self._next_buf = 0

    def new_buf(self, div: int, channels: int, kernel: bool = True) -> Buf:
        self._next_buf += 1
        return Buf(self._next_buf, div, channels, kernel)

    def new_slot(self, channels: int) -> SumsSlot:
        slot = SumsSlot(len(self.plan.slots), channels)
        self.plan.slots.append(slot)
        return slot

    # Values -----------------------------------------------------------------------------------

    def source(self, value: Value) -> Source:
        if isinstance(value, Plain):
            return Source(value.buf)
        if value.plain is not None:
            return Source(value.plain)
        if isinstance(value, Deferred):
            return Source(value.t, value.u, value.sums, value.block)
        base = self.source(value.base)
        extra = list(value.addends)
        return Source(base.t, base.u, base.sums, base.producer, *(extra + [None, None])[:2])

    def materialize(self, value: Value) -> Buf:
        if isinstance(value, Plain):
            return value.buf
        if value.plain is None:
            src = self.source(value)
            value.plain = self.new_buf(src.t.div, src.t.channels)
            self.plan.launches.append(Materialize(src, value.plain))
        return value.plain

    def add(self, a: Value, b: Value) -> Value:
        if isinstance(a, Plain) and not isinstance(b, Plain):
            a, b = b, a
        if isinstance(a, Sum) and a.plain is None:
            if len(a.addends) < 2:
                return Sum(a.base, a.addends + [self.materialize(b)])
            a = Plain(self.materialize(a))
        elif isinstance(a, Deferred) and a.plain is not None:
            a = Plain(a.plain)
        return Sum(a, [self.materialize(b)])

    # Nodes ------------------------------------------------------------------------------------

    def rrcab(self, name: str, block: RRCAB, value: Value) -> Deferred:
        channels = block.body[0].in_channels
        if 16 % (channels // block.body[0].groups):
            raise UnsupportedModel(
                f"{name}: {channels // block.body[0].groups} channels per group; the kernels need a divisor of 16"
            )
        src = self.source(value)
        div = src.t.div
        for step in range(1 + block.num_steps):
            x_out = None if src.is_plain else self.new_buf(div, channels)
            if step == 0 and x_out is not None and not isinstance(value, Plain):
                value.plain = x_out
            fused = channels <= self.fused_max_channels
            a = None if fused else self.new_buf(div, channels)
            launch = RRCABPass(name, src, x_out, a, self.new_buf(div, channels), self.new_slot(channels))
            self.plan.launches.append(launch)
            src = Source(x_out or src.t, launch.u, launch.sums, name)
        return Deferred(src.t, src.u, src.sums, name)

    def layer(self, name: str, module: nn.Module, values: list[Value]) -> Plain:
        deferred = None
        if self.conv_kernels and len(values) == 1 and not isinstance(values[0], Plain) and values[0].plain is None:
            deferred = self.source(values[0])  # the first conv finishes it; no materialize launch
            inputs = [deferred.t]
        else:
            inputs = [self.materialize(v) for v in values]
        divs = {b.div for b in inputs}
        if len(divs) != 1:
            raise UnsupportedModel(f"{name}: inputs at different resolutions")
        div = divs.pop()
        if self.conv_kernels:
            bufs = inputs
            for step in lower(name, module):
                conv = self.model.get_submodule(step.module)
                step_div = div * step.stride // (2 if step.shuffle else 1)
                channels = conv.out_channels
                if step.shuffle and isinstance(conv, nn.Conv2d):
                    channels //= 4
                if step_div < 1 or (len(bufs) > 1 and conv.in_channels % len(bufs)):
                    raise UnsupportedModel(f"{step.module}: cannot run as a kernel")
                step.parts, step.out = bufs, self.new_buf(step_div, channels)
                step.src, deferred = deferred, None
                self.plan.launches.append(step)
                bufs, div = [step.out], step_div
            return Plain(bufs[0])
        div, ch = _out_shape(module, div, sum(b.channels for b in inputs))
        out = self.new_buf(div, ch, kernel=False)
        self.plan.launches.append(Layer(name, inputs, out))
        return Plain(out)

    def build(self, graph: fx.Graph) -> Plan:
        env: dict[fx.Node, Value] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "call_module":
                module = self.model.get_submodule(node.target)
                (arg,) = node.args
                if node.target == "head" and arg.op == "placeholder":
                    out = self.new_buf(1, module.out_channels)
                    self.plan.launches.append(Head(out))
                    env[node] = Plain(out)
                elif isinstance(module, RRCAB):
                    if isinstance(env[arg], tuple):
                        raise UnsupportedModel(f"{node.target}: a concat may only feed a conv")
                    env[node] = self.rrcab(node.target, module, env[arg])
                else:
                    parts = env[arg][1] if isinstance(env[arg], tuple) else [env[arg]]
                    env[node] = self.layer(node.target, module, parts)
            elif node.op == "call_function" and node.target is operator.add:
                env[node] = self.add(env[node.args[0]], env[node.args[1]])
            elif node.op == "call_function" and node.target is torch.cat:
                (parts,) = node.args
                # The 1×1 conv that reads the concat takes its parts as separate inputs.
                env[node] = ("cat", [env[p] for p in parts])
            elif node.op == "output":
                self.plan.launches.append(Tail(self.source(env[node.args[0]])))
            else:
                raise UnsupportedModel(f"unexpected graph node {node.op} {node.target}")
        return self.plan


def _grows(launch: Launch) -> bool:
    """A movable launch whose output is bigger than what it reads (the up-sampling convs)."""
    if not launch.movable:
        return False
    (out,) = launch.outputs()
    return out.channels / out.div ** 2 > sum(b.channels / b.div ** 2 for b in launch.value_inputs())


def sink_upsampling(plan: Plan) -> Plan:
    """Move every up-sampling launch down to just before its first reader.

    The graph's order computes level 3's full-resolution output L3 (and level 2's L2) long before
    the reconstruction reads them; holding the small input instead of the large output over that
    span lowers the arena's peak. Only the launch moves; its inputs simply live longer.
    """
    launches = list(plan.launches)
    for launch in [x for x in launches if _grows(x)]:
        launches.remove(launch)
        first = next(i for i, other in enumerate(launches) if launch.out in other.reads())
        launches.insert(first, launch)
    plan.launches = launches
    return plan


def addend_buffers(plan: Plan) -> set[Buf]:
    """The arena buffers whose every reader reads them as an addend of a deferred value (a pass's
    ``u``, a sum's ``e1``/``e2``) and never as a base ``t`` or a plain conv input: each RRCAB
    pass's ``u`` and the outputs of the convs whose results are only added to the stream (the
    transposed convs, the last up-sampling of levels 2 and 3). A backend may store these in a
    narrower type than the residual stream (the native backend's bfloat16 mode). Only what passes
    and convs write qualifies: the head's output, ``x_out`` and materialized values are bases."""
    written, addend, base = set(), set(), set()
    for launch in plan.launches:
        if isinstance(launch, RRCABPass):
            written.add(launch.u)
        elif isinstance(launch, Conv):
            written.add(launch.out)
        src = getattr(launch, "src", None)
        extra = [b for b in (src.u, src.e1, src.e2) if b is not None] if isinstance(src, Source) else []
        addend.update(extra)
        base.update(b for b in launch.reads() if b not in extra)
    return {b for b in written & addend if b.kernel and b not in base}


def build_plan(model: MSFIN, conv_kernels: bool = True, fused_max_channels: int = 0) -> Plan:
    """The launches for one forward of ``model`` (head to tail), independent of the input shape.

    ``conv_kernels``: run the layers between RRCAB blocks as backend conv launches (False: as the
    reference's PyTorch modules, i.e. cuDNN on a GPU). ``fused_max_channels``: each RRCAB pass up
    to this many channels wide is one launch that keeps conv1's output on chip (no ``a`` buffer);
    0 runs every pass as two launches. The backend says what it can fuse.
    """
    if model.config.scale != 4:
        raise UnsupportedModel(f"the engine's head kernel is specialised for ×4 (model is ×{model.config.scale})")
    plan = Planner(model, conv_kernels, fused_max_channels).build(trace_features(model))
    return sink_upsampling(plan)


def whole_network_plan() -> Plan:
    """One launch that runs the whole network as a PyTorch module (the ``reference`` and ``cpu`` backends)."""
    return Plan([Network()])
