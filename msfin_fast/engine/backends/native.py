"""The ``native`` backend: the plan's launches by this project's C++ CPU kernels (``msfin_fast._cpu``,
csrc/cpu/), computed in fp32, NHWC.

Each RRCAB pass is one call that streams the image row by row over column strips, keeping the
finished input, conv1's output and conv2's output for a few rows in per-thread buffers (the
whole grouped 3×3 → ReLU → grouped 3×3 → ReLU → 1×1 chain, the channel sums and the finishing
of the deferred input in one sweep). Deferred values read by a dense conv are finished by the
C++ ``materialize`` first. The head (bilinear upsampling and sub_mean row by row, then its conv)
and the tail (its deferred input finished row by row, the conv with add_mean folded in, NCHW out)
stream the same way; the dense convolutions between blocks (down/up-sampling, the
concatenations' 1×1s read as separate inputs, the transposed convs as 1×1s stored
pixel-shuffled) are this module's too. Every call runs on the module's own threads,
``torch.get_num_threads()`` of them, which sleep between calls (after a 0.2 ms watch for the
next). The executor records an arena's calls on its first run and replays them after (``Program``). (Mixing in PyTorch's convolutions cost up to 2× on a 2-core machine: after each of
them PyTorch's OpenMP threads spin, taking the core the next kernel needs; benchmarks/NOTES.md.)

Activations are fp32 for fp32 and fp16 engines (``storage_dtype``; the output is cast to the
engine's dtype as the ``cpu`` backend's is). A bfloat16 engine keeps the residual stream (the
head's output, every pass's finished input ``x_out``, what dense convs read), the channel sums
and the SR image in fp32 and stores in bf16 only what is added to that stream: each pass's ``u``
and the outputs of the convs read only as addends (the transposed convs, the up-sampling to full
resolution). Those are rounded to nearest even once, when stored, and widened on load; all
arithmetic stays fp32 (``addend_dtype``; plan.addend_buffers says which buffers those are).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...model import RRCAB
from ..source import Source
from . import BackendStatus, DenseCA, fold_tail, pack_plan

try:
    from ... import _cpu
    _IMPORT_ERROR = None
except ImportError as exc:  # not built: the backend says so, auto passes it over
    _cpu = None
    _IMPORT_ERROR = str(exc)

GROUP_SIZES = (1, 2, 4, 8, 16)  # channels per group the kernel has variants for
MAX_CHANNELS = 128


def available() -> bool:
    return _cpu is not None


def isa() -> str | None:
    """The instruction set the kernels run with here (``avx512``, ``avx2`` or ``portable``)."""
    return _cpu.isa() if _cpu is not None else None


def not_built_reason() -> str:
    return (f"the CPU kernels msfin_fast._cpu are not built ({_IMPORT_ERROR}); reinstall with "
            "MSFIN_CPU_EXT=1 to see why, or build them with MSFIN_CPU_EXT=1 python setup.py build_ext --inplace")


def block_configs(model: nn.Module) -> set[tuple[int, int]]:
    return {(m.body[0].in_channels, m.body[0].groups) for m in model.modules() if isinstance(m, RRCAB)}


def config_problem(channels: int, groups: int) -> str | None:
    if channels % 8 or channels > MAX_CHANNELS or channels % groups or channels // groups not in GROUP_SIZES:
        return (f"the CPU kernels need RRCAB channels a multiple of 8 up to {MAX_CHANNELS} with "
                f"{GROUP_SIZES} channels per group (got {channels} channels in {groups} groups)")
    return None


# Packed weights ------------------------------------------------------------------------------------


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous()


NativeCA = DenseCA  # the CUDA kernel's layout too


@dataclass
class NativeBlock:
    """An RRCAB for the kernel: ``w1``/``w2`` as torch stores grouped convs ([C, C/G, 3, 3]),
    ``w3t`` the 1×1 transposed ([C in, C out]), biases fp32, and its CA for whoever reads its output."""

    channels: int
    groups: int
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3t: torch.Tensor
    b3: torch.Tensor
    ca: NativeCA


def pack_block(block: RRCAB, dtype: torch.dtype) -> NativeBlock:
    conv1, conv2, conv3 = block.body[0], block.body[2], block.body[4]
    c = conv1.out_channels
    return NativeBlock(c, conv1.groups, _f32(conv1.weight), _f32(conv1.bias), _f32(conv2.weight), _f32(conv2.bias),
                       _f32(conv3.weight.reshape(c, c).t()), _f32(conv3.bias), DenseCA.of(block.body[5]))


STORE_PLAIN, STORE_SHUFFLE = 0, 1  # kernels.h: how a conv stores its outputs


@dataclass
class NativeConv:
    """A dense conv as csrc/cpu's conv runs it: ``w`` [k·k, C in, K], ``b`` [K] (K a multiple of 8),
    stored ``store``-wise with ``cout`` channels (STORE_SHUFFLE doubles the resolution)."""

    w: torch.Tensor
    b: torch.Tensor
    ksize: int
    stride: int
    cout: int
    store: int

    @property
    def K(self) -> int:
        return self.w.shape[2]


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] → [k·k, in, out] (float64 for the folds)."""
    o, i, k, _ = weight.shape
    return weight.detach().double().permute(2, 3, 1, 0).reshape(k * k, i, o)


def _native_conv(taps: torch.Tensor, bias: torch.Tensor | None, ksize: int, stride: int, cout: int,
                 store: int) -> NativeConv:
    kk, cin, k = taps.shape
    kp = -(-k // 8) * 8
    w = torch.zeros(kk, cin, kp, dtype=torch.float64)
    w[:, :, :k] = taps
    b = torch.zeros(kp, dtype=torch.float64)
    if bias is not None:
        b[:k] = bias.detach().double()
    return NativeConv(w.float().contiguous(), b.float().contiguous(), ksize, stride, cout, store)


def pack_conv(conv, n_src: int, dtype: torch.dtype, shuffle: bool = False) -> NativeConv:
    """A Conv2d (with ``shuffle``: followed by PixelShuffle(2)) or a 2×2 stride-2 ConvTranspose2d."""
    if isinstance(conv, nn.ConvTranspose2d):
        w = conv.weight.detach().double()  # [in, out, 2, 2]
        cin, cout = w.shape[:2]
        taps = w.permute(0, 2, 3, 1).reshape(1, cin, 4 * cout)  # k = (2i + j)·out + c
        bias = conv.bias.detach().double().repeat(4) if conv.bias is not None else None
        return _native_conv(taps, bias, 1, 1, cout, STORE_SHUFFLE)
    k = conv.kernel_size[0]
    taps = _taps(conv.weight)
    bias = conv.bias.detach().double() if conv.bias is not None else None
    if not shuffle:
        return _native_conv(taps, bias, k, conv.stride[0], conv.out_channels, STORE_PLAIN)
    cout = conv.out_channels // 4
    order = torch.tensor([c * 4 + q for q in range(4) for c in range(cout)])  # conv channel c·4 + q → q·cout + c
    return _native_conv(taps[:, :, order], bias[order] if bias is not None else None, k, conv.stride[0], cout,
                        STORE_SHUFFLE)


@dataclass
class NativeHead:
    """The head for the C++ kernel: sub_mean's matrix and bias, the conv's weights as torch stores
    them ([C, 3, 3, 3]) and its bias, fp32."""

    scale: int
    mean_w: torch.Tensor
    mean_b: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor


def pack_head(sub_mean, head, scale: int) -> NativeHead:
    return NativeHead(scale, _f32(sub_mean.weight.reshape(3, 3)), _f32(sub_mean.bias), _f32(head.weight),
                      _f32(head.bias))


@dataclass
class NativeTail:
    """tail2 with add_mean folded in (``fold_tail``): ``w`` [3, C, 3, 3], ``b`` [3], fp32."""

    w: torch.Tensor
    b: torch.Tensor


def pack_tail(tail, add_mean, dtype: torch.dtype) -> NativeTail:
    w, b = fold_tail(tail, add_mean)
    return NativeTail(_f32(w), _f32(b))


class _Packers:
    """pack_plan's packers, each conv packed knowing whether its plan step ends in a pixel shuffle."""

    def __init__(self, model, plan):
        shuffled = {launch.module for launch in plan.launches if getattr(launch, "shuffle", False)}
        self.shuffled = {id(model.get_submodule(name)) for name in shuffled}
        self.pack_block, self.pack_head, self.pack_tail = pack_block, pack_head, pack_tail

    def pack_conv(self, conv, n_src, dtype):
        return pack_conv(conv, n_src, dtype, shuffle=id(conv) in self.shuffled)


# Checks ----------------------------------------------------------------------------------------


F32, BF16 = torch.float32, torch.bfloat16


def _check(name: str, x: torch.Tensor | None, shape: tuple, required: bool = True, dtypes: tuple = (F32,)) -> int:
    """The address of ``x`` after checking it is a contiguous CPU tensor of ``shape`` in one of
    ``dtypes`` (0: None)."""
    if x is None:
        if required:
            raise ValueError(f"{name}: a tensor is required")
        return 0
    if x.dtype not in dtypes or x.device.type != "cpu":
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: the CPU kernels take {allowed} CPU tensors here, got {x.dtype} on {x.device}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    return x.data_ptr()


def _addends_bf16(tensors) -> bool:
    """Whether the addends (u, e1, e2 that are set) are bf16; they must share one dtype."""
    kinds = {x.dtype for x in tensors if x is not None}
    if len(kinds) > 1:
        raise ValueError(f"the addends u, e1, e2 must share one dtype (float32 or bfloat16), got {sorted(map(str, kinds))}")
    return kinds == {BF16}


def _source_args(src: Source) -> tuple:
    """(t, u, e1, e2, CaArgs, addends in bf16) of a Source, checked (t fp32; u, e1, e2 fp32 or bf16)."""
    t = src.t
    if t.dim() != 4:
        raise ValueError(f"source t: expected NHWC [N, H, W, C], got shape {tuple(t.shape)}")
    n, h, w, c = t.shape
    if c % 8:
        raise ValueError(f"source t: the CPU kernels need a multiple of 8 channels, got {c}")
    shape = tuple(t.shape)
    if src.e1 is None and src.e2 is not None:
        raise ValueError("e2 given without e1")
    either = (F32, BF16)
    addresses = [_check("t", t, shape), _check("u", src.u, shape, False, either),
                 _check("e1", src.e1, shape, False, either), _check("e2", src.e2, shape, False, either)]
    bf16 = _addends_bf16((src.u, src.e1, src.e2))
    if src.deferred:
        ca = getattr(src.producer, "ca", None)
        if not isinstance(ca, NativeCA):
            raise ValueError(f"a deferred source needs its producer's NativeCA, got {type(ca).__name__}")
        if ca.w1.shape[1] != c:
            raise ValueError(f"CA weights for {ca.w1.shape[1]} channels, source has {c}")
        cargs = _cpu.CaArgs(_check("sums", src.sums, (n, c)), ca.w1.data_ptr(), ca.b1.data_ptr(), ca.w2.data_ptr(),
                            ca.b2.data_ptr(), ca.squeeze)
    else:
        cargs = _cpu.CaArgs(0, 0, 0, 0, 0, 0)
    return (*addresses, cargs, bf16)


# Columns per strip. Wider strips recompute fewer halo columns; past 128 their planar rows (3 input,
# 3 conv1, 1 conv2) leave L2 at 96 channels. Measured on a 2-core Zen 3 (AVX2) at 16–96 channels:
# 64–256 columns within 5 % of each other, 32 up to 25 % slower (benchmarks/NOTES.md).
STRIP_COLS = 128


PIECES = 8  # pieces (strips × bands) each image is cut into, whatever the batch and the threads


def band_rows(h: int, strips: int) -> int:
    """Rows per band: enough bands that each image makes about ``PIECES`` pieces of work, at least 8
    rows each (a band recomputes 2 rows of conv1 above it). It depends on the image's size alone, so
    the pieces, and the order the channel sums are added in, are the same at any batch size and
    thread count: an image gives the same bytes alone, in a batch and on any number of threads."""
    bands = max(1, min(-(-PIECES // strips), h // 8))
    return -(-h // bands)


class Program:
    """The ``_cpu`` calls of one forward over one arena: recorded on the arena's first run (every
    operand checked then), replayed on the next ones without the Python in between. The arena's
    tensors, the packed weights and the recorded temporaries keep their addresses; the LR input's
    and the SR output's are the only ones that change, and they are put in where the recording had
    them. The calls are made with the thread count of the recording: another one records again."""

    def __init__(self, x: torch.Tensor, out: torch.Tensor, threads: int):
        self.x, self.out, self.threads = x.data_ptr(), out.data_ptr(), threads
        self.calls: list = []  # (function, args, positions of the input's address, of the output's)
        self.keep: list[torch.Tensor] = []  # temporaries the calls write (conv inputs finished first)
        self.replayable = True

    def add(self, fn, args: tuple) -> None:
        at_x = [i for i, a in enumerate(args) if type(a) is int and a == self.x]
        at_out = [i for i, a in enumerate(args) if type(a) is int and a == self.out]
        self.calls.append((fn, args, at_x, at_out))

    def replay(self, x: torch.Tensor, out: torch.Tensor) -> None:
        xa, oa = x.data_ptr(), out.data_ptr()
        for fn, args, at_x, at_out in self.calls:
            if at_x or at_out:
                args = list(args)
                for i in at_x:
                    args[i] = xa
                for i in at_out:
                    args[i] = oa
            fn(*args)


class NativeBackend:
    """Every launch by the C++ CPU kernels (``msfin_fast._cpu``)."""

    name = "native"
    whole_network = False
    fused_max_channels = 1 << 30  # every pass is one call, conv1's output never leaves the strip

    @classmethod
    def status(cls) -> BackendStatus:
        """The C++ CPU kernels: built or not, and the instruction set they run with here."""
        name = "native (C++ CPU kernels, msfin_fast._cpu)"
        if _cpu is None:
            return BackendStatus(name, False, not_built_reason())
        others = [i for i in _cpu.isas() if i != isa()]
        return BackendStatus(name, True, f"runs with {isa()}" + (f" (also built: {', '.join(others)})" if others else "")
                             + f", {torch.get_num_threads()} threads, fp32 (--bf16: the addends stored in bf16); "
                             "the default on a CPU (backend='auto')")

    def __init__(self, fuse_rrcab: bool = False, tile_cols: int | None = None, band_rows: int | None = None):
        self.tile_cols = tile_cols
        self.band_rows = band_rows
        self._recording: Program | None = None
        # The executor records this backend's calls over an arena and replays them (False: every
        # run goes through the launches, e.g. to time them one by one).
        self.records_calls = True

    # Record and replay (the executor's eager runs; engines serialize their calls) ------------------

    @contextlib.contextmanager
    def recording(self, x: torch.Tensor, out: torch.Tensor):
        """Record the calls of the launches run inside: yields the Program (``replayable`` False
        where a call's operands would not be there next time)."""
        self._recording = program = Program(x, out, self.threads())
        try:
            yield program
        finally:
            self._recording = None

    def replay(self, program: Program, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Run a recorded forward for a new input and output; False (nothing run) if it cannot."""
        if not program.replayable or program.threads != self.threads():
            return False
        program.replay(x, out)
        return True

    def _call(self, fn, *args) -> None:
        fn(*args)
        if self._recording is not None:
            self._recording.add(fn, args)

    #: What an engine on this backend may be asked for (bf16: addends stored in bf16, see above).
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def addend_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What the buffers read only as addends are stored in (plan.addend_buffers)."""
        return BF16 if dtype == BF16 else torch.float32

    def unavailable_reason(self, model) -> str | None:
        device = model.head.weight.device
        if device.type != "cpu":
            return f"the native backend runs on the CPU (the model is on {device})"
        if _cpu is None:
            return not_built_reason()
        for channels, groups in sorted(block_configs(model)):
            problem = config_problem(channels, groups)
            if problem:
                return problem
        return None

    def pack(self, model, plan, dtype):
        return pack_plan(model, plan, torch.float32, _Packers(model, plan))

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        return 0  # the kernel's row buffers are its own, per thread

    @staticmethod
    def threads() -> int:
        return max(1, torch.get_num_threads())

    def _finished(self, src: Source) -> torch.Tensor:
        """The source as a plain NHWC tensor (``t`` itself when there is nothing to finish)."""
        if src.is_plain:
            return src.t
        out = torch.empty_like(src.t)
        self.materialize(src, out)
        if self._recording is not None:
            self._recording.keep.append(out)
        return out

    # Launch operations -------------------------------------------------------------------------------

    def rrcab_pass(self, src: Source, p: NativeBlock, x_out, a, u_out, sums, fused: bool = False) -> None:
        t, u, e1, e2, cargs, bf16 = _source_args(src)
        n, h, w, c = src.t.shape
        if c != p.channels:
            raise ValueError(f"the block has {p.channels} channels, the input {c}")
        shape = tuple(src.t.shape)
        x_addr = _check("x_out", x_out, shape, False)
        u_addr = _check("u_out", u_out, shape, dtypes=(F32, BF16))
        s_addr = _check("sums", sums, (n, c))
        cols, rows = self._tiling(h, w)
        self._call(_cpu.rrcab_pass, t, u, e1, e2, cargs, x_addr, u_addr, s_addr, p.w1.data_ptr(), p.b1.data_ptr(),
                   p.w2.data_ptr(), p.b2.data_ptr(), p.w3t.data_ptr(), p.b3.data_ptr(), n, h, w, c, p.groups,
                   self.threads(), cols, rows, bf16, u_out.dtype == BF16)

    def materialize(self, src: Source, out: torch.Tensor) -> None:
        t, u, e1, e2, cargs, bf16 = _source_args(src)
        n, h, w, c = src.t.shape
        self._call(_cpu.materialize, t, u, e1, e2, cargs, _check("out", out, tuple(src.t.shape)), n, h, w, c,
                   self.threads(), bf16)

    def _conv(self, parts: list[torch.Tensor], p: NativeConv, out: torch.Tensor, leaky: bool = False) -> None:
        n, h, w, _ = parts[0].shape
        cin = sum(t.shape[3] for t in parts)
        if p.w.shape[1] != cin:
            raise ValueError(f"conv: weights for {p.w.shape[1]} input channels, inputs have {cin}")
        pad = p.ksize // 2
        ho, wo = (h + 2 * pad - p.ksize) // p.stride + 1, (w + 2 * pad - p.ksize) // p.stride + 1
        if p.store == STORE_PLAIN:
            expected = (n, ho, wo, p.K)
        elif p.store == STORE_SHUFFLE:
            expected = (n, 2 * ho, 2 * wo, p.cout)
        else:
            expected = (n, p.cout, ho, wo)
        addresses = [_check(f"input {i}", t, (n, h, w, t.shape[3])) for i, t in enumerate(parts)]
        self._call(_cpu.conv, addresses, [t.shape[3] for t in parts], n, h, w, ho, wo, p.ksize, p.stride, p.K, p.cout,
                   p.store, leaky, p.w.data_ptr(), p.b.data_ptr(), _check("out", out, expected, dtypes=(F32, BF16)),
                   self.threads(), out.dtype == BF16)

    def _tiling(self, h: int, w: int) -> tuple[int, int]:
        cols = min(w, self.tile_cols or STRIP_COLS)
        return cols, self.band_rows or band_rows(h, -(-w // cols))

    def head(self, x: torch.Tensor, p: NativeHead, out: torch.Tensor) -> None:
        n, c, h, w = x.shape
        if c != 3:
            raise ValueError(f"head: expected an RGB image [N, 3, h, w], got {tuple(x.shape)}")
        converted = x.float().contiguous()
        if converted.data_ptr() != x.data_ptr() and self._recording is not None:
            self._recording.replayable = False  # the recording would hold a temporary's address
        x = converted
        k = p.w.shape[0]
        H, W = p.scale * h, p.scale * w
        self._call(_cpu.head, x.data_ptr(), n, h, w, p.scale, p.mean_w.data_ptr(), p.mean_b.data_ptr(), p.w.data_ptr(),
                  p.b.data_ptr(), k, _check("out", out, (n, H, W, k)), self.threads(), *self._tiling(H, W))

    def tail(self, src: Source, p: NativeTail, out: torch.Tensor) -> None:
        t, u, e1, e2, cargs, bf16 = _source_args(src)
        n, h, w, c = src.t.shape
        if p.w.shape[1] != c:
            raise ValueError(f"tail: weights for {p.w.shape[1]} channels, the input has {c}")
        self._call(_cpu.tail, t, u, e1, e2, cargs, p.w.data_ptr(), p.b.data_ptr(), _check("out", out, (n, 3, h, w)),
                   n, h, w, c, self.threads(), *self._tiling(h, w), bf16)

    def conv(self, inputs, p: NativeConv, out: torch.Tensor, step) -> None:
        parts = [self._finished(inputs)] if isinstance(inputs, Source) else list(inputs)
        self._conv(parts, p, out, leaky=step.leaky)


BACKENDS = {"native": NativeBackend}
