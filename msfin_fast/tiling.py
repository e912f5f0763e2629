"""Large images: plain tiles, exact tiles, and the memory estimate that picks between them.

Every RRCAB at full resolution holds ``n`` channels per output pixel, so a photo that fits in host
memory as uint8 may not fit on a GPU at HR size. Two ways through:

* **Plain tiles** (``tiled_forward``), as Real-ESRGAN users know them: the LR image is cut into
  ``tile``×``tile`` tiles, each run with ``tile_pad`` LR pixels of context on every side, and only
  the tile's core is written to the output, so no seam is visible. Channel attention pools over what
  the network sees, so the result differs slightly from a whole-image run (like the authors'
  ``--chop``).
* **Exact tiles** (``exact_tiled_forward``) reproduce the whole-image output. The network is walked
  layer by layer along the graph traced from the reference (``graph.trace_features``), full-size
  activations stay on a storage device (the host by default), and each layer runs tile by tile on
  the compute device with the halo its receptive field needs. In every RRCAB step the pre-attention
  map ``u`` is computed tile by tile, its channel sums are reduced across all tiles, the attention
  scale is computed once from the whole-image mean, and only then is ``t + s·u`` formed.

``bytes_per_output_pixel`` derives the memory a whole-image reference run needs from the same graph,
so callers can fall back to tiles before running out of memory rather than after.

Thread safety: graphs are recorded without patching torch (``graph.record``), and the graph, the
footprints and the memory estimate are cached per model (``prepare_exact`` fills them up front), so
any number of threads may run tiles and estimates at once, beside any other model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import torch
from torch import fx, nn

from .errors import InvalidInputError
from .trace import record, trace_features
from .model import MSFIN, RRCAB, check_input, pyramid_pad

DEFAULT_TILE_PAD = 10
MIN_TILE = 8
# The graph counts live activations only. A CPU run's peak RSS grew by 2.2–2.8× that count per
# output pixel (convolution workspaces, layout reorders, allocator slack; MSFIN and MSFIN-S, 128² and
# 192² LR), so budgets are checked against 3× the count.
HEADROOM = 3.0


def _check_tile(tile: int, tile_pad: int) -> None:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise InvalidInputError(f"tile must be a positive number of LR pixels, got {tile!r}")
    if not isinstance(tile_pad, int) or isinstance(tile_pad, bool) or tile_pad < 0:
        raise InvalidInputError(f"tile_pad must be a non-negative number of LR pixels, got {tile_pad!r}")


#: ``callback(done, total)`` that the tile loops call after each tile (exact tiles: after each layer)
#: while :func:`tile_progress` has set it. A context variable, so that only the code that set it
#: (the CLI's progress display) is called, never a serving thread's run.
_TILE_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("msfin_fast_tile_progress", default=None)


@contextlib.contextmanager
def tile_progress(callback: Callable[[int, int], None] | None):
    """Within the block, tiled runs report ``callback(done, total)`` as they go (None: nothing)."""
    token = _TILE_PROGRESS.set(callback)
    try:
        yield
    finally:
        _TILE_PROGRESS.reset(token)


def _report(done: int, total: int) -> None:
    callback = _TILE_PROGRESS.get()
    if callback is not None:
        callback(done, total)


def _spans(length: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, size):
        yield start, min(start + size, length)


# ---------------------------------------------------------------------------------------------
# Plain tiles


@torch.inference_mode()
def tiled_forward(model: nn.Module, x: torch.Tensor, tile: int, tile_pad: int = DEFAULT_TILE_PAD) -> torch.Tensor:
    """Run ``model`` ([N,3,h,w] 0–255 → [N,3,s·h,s·w]) on LR tiles; the result lands on x's device.

    Each tile is ``tile``×``tile`` LR pixels (smaller at the right and bottom edges) run with
    ``tile_pad`` pixels of context on each side, clipped at the image border; only the core
    ``s·tile``×``s·tile`` output is kept. Tiles go to the model's device one at a time.
    """
    _check_tile(tile, tile_pad)
    check_input(x, check_finite=False)
    device = _module_device(model, x.device)
    n, _, h, w = x.shape
    out, scale = None, None
    done, total = 0, len(range(0, h, tile)) * len(range(0, w, tile))
    for y0, y1 in _spans(h, tile):
        a_y, b_y = max(y0 - tile_pad, 0), min(y1 + tile_pad, h)
        for x0, x1 in _spans(w, tile):
            a_x, b_x = max(x0 - tile_pad, 0), min(x1 + tile_pad, w)
            result = model(x[:, :, a_y:b_y, a_x:b_x].to(device))
            if scale is None:
                scale = result.shape[-1] // (b_x - a_x)
                if result.shape[-2:] != (scale * (b_y - a_y), scale * (b_x - a_x)):
                    raise InvalidInputError(
                        f"the model maps a {b_y - a_y}×{b_x - a_x} tile to {tuple(result.shape[-2:])}, "
                        "not an integer multiple; plain tiles need a fixed upscaling factor"
                    )
            core = result[:, :, (y0 - a_y) * scale:(y1 - a_y) * scale, (x0 - a_x) * scale:(x1 - a_x) * scale]
            if out is None:
                out = torch.empty(n, result.shape[1], h * scale, w * scale, dtype=result.dtype, device=x.device)
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale].copy_(core)
            done += 1
            _report(done, total)
    return out


def _module_device(model: nn.Module, default: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return default


# ---------------------------------------------------------------------------------------------
# Receptive fields of the graph's leaves


@dataclass(frozen=True)
class Footprint:
    """How a layer maps space: output resolution = ``factor`` × input resolution, and an output
    pixel at ``o`` depends on input pixels within ``halo`` of ``o / factor`` (in input pixels)."""

    factor: Fraction
    halo: Fraction

    def then(self, other: "Footprint") -> "Footprint":
        """This layer followed by ``other``."""
        return Footprint(self.factor * other.factor, self.halo + other.halo / self.factor)


_IDENTITY = Footprint(Fraction(1), Fraction(0))
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Identity, nn.PReLU, nn.Tanh, nn.GELU, nn.SiLU)


def footprint(module: nn.Module) -> Footprint:
    """The footprint of a conv, a pointwise activation, a pixel shuffle, or a module built of them.

    Containers are traced with ``torch.fx`` (their submodules as leaves), so the composition follows
    the module's own forward rather than an assumed child order.
    """
    if isinstance(module, nn.Conv2d):
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if isinstance(p, str) or len({k[0], k[1]}) != 1 or len({s[0], s[1]}) != 1 or len({p[0], p[1]}) != 1 \
                or d != (1, 1):
            raise NotImplementedError(f"exact tiling needs square, undilated convs; got {module}")
        return Footprint(Fraction(1, s[0]), Fraction(max(p[0], k[0] - 1 - p[0])))
    if isinstance(module, nn.ConvTranspose2d):
        k, s, p, op = module.kernel_size, module.stride, module.padding, module.output_padding
        if k != s or p != (0, 0) or op != (0, 0) or k[0] != k[1] or module.dilation != (1, 1):
            raise NotImplementedError(f"exact tiling needs transposed convs with kernel == stride; got {module}")
        return Footprint(Fraction(s[0]), Fraction(0))
    if isinstance(module, nn.PixelShuffle):
        return Footprint(Fraction(module.upscale_factor), Fraction(0))
    if isinstance(module, _POINTWISE):
        return _IDENTITY
    return _traced_footprint(module)


def _traced_footprint(module: nn.Module) -> Footprint:
    if isinstance(module, nn.Sequential):
        result = _IDENTITY
        for child in module:
            result = result.then(footprint(child))
        return result
    try:
        graph = record(module, type(module).forward)
    except Exception as exc:
        raise NotImplementedError(f"cannot trace {type(module).__name__} for exact tiling: {exc}") from None
    prints: dict[fx.Node, Footprint] = {}
    result = None
    for node in graph.nodes:
        inputs = [prints[a] for a in node.all_input_nodes]
        if node.op == "placeholder":
            prints[node] = _IDENTITY
        elif node.op == "call_module" and len(inputs) == 1:
            prints[node] = inputs[0].then(footprint(module.get_submodule(node.target)))
        elif node.op == "call_function" and node.target in (operator.add, torch.add, operator.mul) and inputs:
            if len({f.factor for f in inputs}) != 1:
                raise NotImplementedError(f"{type(module).__name__} adds maps of different resolutions")
            prints[node] = Footprint(inputs[0].factor, max(f.halo for f in inputs))
        elif node.op == "output":
            result = inputs[0]
        else:
            raise NotImplementedError(
                f"exact tiling cannot map {node.op} {node.target} inside {type(module).__name__}"
            )
    return result


# Per-model results of walking the graph, so that no call during inference records anything. Keyed
# by the module object (weakly: a model that is dropped drops its entries); a module whose layers are
# replaced after its first tiled run should be given to clear_graph_caches().
_CACHE_LOCK = threading.Lock()
_FOOTPRINTS: "weakref.WeakKeyDictionary[nn.Module, Footprint]" = weakref.WeakKeyDictionary()
_PRE_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, Footprint]" = weakref.WeakKeyDictionary()
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, fx.Graph]" = weakref.WeakKeyDictionary()


def _cached(table: weakref.WeakKeyDictionary, key: nn.Module, compute: Callable[[], object]):
    with _CACHE_LOCK:
        found = table.get(key)
    if found is None:
        found = compute()  # outside the lock: it may look up other entries
        with _CACHE_LOCK:
            found = table.setdefault(key, found)
    return found


def cached_footprint(module: nn.Module) -> Footprint:
    """:func:`footprint`, computed once per module."""
    return _cached(_FOOTPRINTS, module, lambda: footprint(module))


def _rrcab_footprint(block: RRCAB) -> Footprint:
    """The footprint of one step's layers before the channel attention (``body[:-1]``)."""
    return _cached(_PRE_ATTENTION, block, lambda: footprint(block.body[:-1]))


def features_graph(model: MSFIN) -> fx.Graph:
    """``graph.trace_features(model)``, recorded once per model (callers only read it)."""
    return _cached(_GRAPHS, model, lambda: trace_features(model))


def prepare_exact(model: MSFIN) -> None:
    """Walk ``model``'s graph and every layer's footprint now, so exact tiles only read caches."""
    for node in features_graph(model).nodes:
        if node.op == "call_module":
            layer = model.get_submodule(node.target)
            if isinstance(layer, RRCAB):
                _rrcab_footprint(layer)
            else:
                cached_footprint(layer)
    for layer in (model.tail2, model.add_mean):
        cached_footprint(layer)


def clear_graph_caches() -> None:
    """Forget every cached graph, footprint and memory estimate."""
    with _CACHE_LOCK:
        for table in (_FOOTPRINTS, _PRE_ATTENTION, _GRAPHS):
            table.clear()
    bytes_per_output_pixel.cache_clear()


# ---------------------------------------------------------------------------------------------
# Exact tiles


def _input_span(o0: int, o1: int, fp: Footprint, length: int) -> tuple[int, int]:
    """Input rows [a, b) that determine output rows [o0, o1), aligned to the layer's stride."""
    align = fp.factor.denominator
    a = math.floor(Fraction(o0) / fp.factor - fp.halo)
    b = math.ceil(Fraction(o1) / fp.factor + fp.halo)
    a = max((a // align) * align, 0)
    b = min(-(-b // align) * align, length)
    return a, b


class _Tiler:
    """Runs layers tile by tile on ``compute``, keeping whole maps on ``storage``."""

    def __init__(self, tile: int, compute: torch.device, storage: torch.device):
        self.tile, self.compute, self.storage = tile, compute, storage

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], fp: Footprint, inp: torch.Tensor,
              channel_sums: bool = False):
        """``fn`` over ``inp`` tile by tile; with ``channel_sums`` also Σ_HW of the output (float64)."""
        n, _, h, w = inp.shape
        oh, ow = h * fp.factor, w * fp.factor
        if oh.denominator != 1 or ow.denominator != 1:
            raise InvalidInputError(f"map {h}×{w} is not divisible by the layer's stride")
        oh, ow = int(oh), int(ow)
        # Keep the input crop, not the output tile, near ``tile`` pixels for down-sampling layers.
        size = max(1, int(self.tile * min(fp.factor, 1)))
        out, sums = None, None
        for o0y, o1y in _spans(oh, size):
            a_y, b_y = _input_span(o0y, o1y, fp, h)
            for o0x, o1x in _spans(ow, size):
                a_x, b_x = _input_span(o0x, o1x, fp, w)
                res = fn(inp[:, :, a_y:b_y, a_x:b_x].to(self.compute, non_blocking=True))
                oy, ox = o0y - int(a_y * fp.factor), o0x - int(a_x * fp.factor)
                core = res[:, :, oy:oy + o1y - o0y, ox:ox + o1x - o0x]
                if out is None:
                    out = torch.empty(n, res.shape[1], oh, ow, dtype=res.dtype, device=self.storage)
                    sums = torch.zeros(n, res.shape[1], dtype=torch.float64, device=self.compute)
                out[:, :, o0y:o1y, o0x:o1x].copy_(core)
                if channel_sums:
                    sums += core.sum(dim=(2, 3), dtype=torch.float64)
        return (out, sums) if channel_sums else out

    def rrcab(self, block: RRCAB, t: torch.Tensor) -> torch.Tensor:
        """``block(t)`` with the channel attention's mean taken over the whole map."""
        pre, attention = block.body[:-1], block.body[-1]
        fp = _rrcab_footprint(block)
        pixels = t.shape[-2] * t.shape[-1]
        for _ in range(1 + block.num_steps):
            u, sums = self.apply(pre, fp, t, channel_sums=True)
            mean = (sums / pixels).to(u.dtype)[:, :, None, None]
            scale = attention.conv_du(mean).to(self.storage)
            t = torch.addcmul(t, scale, u)
        return t


def _graph_last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last reader it is (so they can be freed after it)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            last[arg] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last.items():
        freed.setdefault(reader, []).append(value)
    return freed


@torch.inference_mode()
def exact_tiled_forward(model: MSFIN, x: torch.Tensor, tile: int = 64,
                        *, storage: torch.device | str | None = None, check_finite: bool = True) -> torch.Tensor:
    """``model(x)`` computed layer by layer over tiles; equal to the whole-image run up to rounding.

    ``tile`` is in LR pixels: every layer's tiles are about ``scale·tile`` pixels on a side at the
    layer's own resolution, so device memory is bounded by a few such tiles at the widest layer.
    Whole maps are kept on ``storage`` (default: x's device; pass "cpu" to keep a GPU's memory to
    tiles). The result is on ``storage``.
    """
    if not isinstance(model, MSFIN):
        raise InvalidInputError(
            f"exact tiling walks the reference MSFIN's graph; got {type(model).__name__}. "
            "Use plain tiles for other modules"
        )
    _check_tile(tile, 0)
    compute = model.head.weight.device
    check_input(x, model.head.weight.dtype, check_finite=check_finite)
    storage = torch.device(storage) if storage is not None else x.device
    s = model.config.scale
    tiler = _Tiler(tile * s, compute, storage)
    x = x.to(storage)

    # The pre- and post-processing of MSFIN.forward: its upsample, pyramid pad and mean shifts.
    def upsample(crop: torch.Tensor) -> torch.Tensor:
        return model.sub_mean(model.upsample(crop))

    y = tiler.apply(upsample, Footprint(Fraction(s), Fraction(1 if s > 1 else 0)), x)
    H, W = y.shape[-2:]
    # sub_mean is pointwise, so padding after it equals the reference's padding before it.
    y = pyramid_pad(y)

    graph = features_graph(model)
    freed = _graph_last_uses(graph)
    env: dict[fx.Node, torch.Tensor] = {}
    features = None
    layers = sum(node.op == "call_module" for node in graph.nodes) + 2  # and the upsample, the tail
    done = 1
    _report(done, layers)
    for node in graph.nodes:
        args = fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        if node.op == "placeholder":
            env[node] = y
            del y
        elif node.op == "call_module":
            layer = model.get_submodule(node.target)
            if isinstance(layer, RRCAB):
                env[node] = tiler.rrcab(layer, *args)
            else:
                env[node] = tiler.apply(layer, cached_footprint(layer), *args)
            done += 1
            _report(done, layers)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "output":
            features = args[0]
        for value in freed.get(node, ()):
            env.pop(value, None)

    tail = nn.Sequential(model.tail2, model.add_mean)
    out = tiler.apply(tail, cached_footprint(model.tail2).then(cached_footprint(model.add_mean)), features)
    _report(layers, layers)
    return out[..., :H, :W]


# ---------------------------------------------------------------------------------------------
# Memory estimate and tile choice


@functools.lru_cache(maxsize=None)
def bytes_per_output_pixel(config, dtype: torch.dtype = torch.float32) -> float:
    """Peak activation bytes of a whole-image reference run, per output pixel, for one image.

    Derived from the traced graph on the meta device (no memory is touched): values are kept from
    the layer that makes them to their last reader, and while a layer runs its input, its output
    and two more maps of its output's size (the temporaries of a conv → ReLU → conv chain) are live.
    """
    with torch.device("meta"):
        model = MSFIN(config).to(dtype)
    side = 16
    y = torch.empty(1, 3, side, side, dtype=dtype, device="meta")
    graph = trace_features(model)
    freed = _graph_last_uses(graph)
    env: dict[fx.Node, torch.Tensor] = {}
    live, peak = 0, 0

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    x_bytes = nbytes(y) // (config.scale ** 2)
    for node in graph.nodes:
        args = fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        if node.op == "placeholder":
            value = y
        elif node.op == "call_module":
            value = model.get_submodule(node.target)(*args)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            break
        env[node] = value
        live += nbytes(value)
        transient = 2 * nbytes(value) if node.op == "call_module" else 0
        peak = max(peak, live + transient)
        for old in freed.get(node, ()):
            live -= nbytes(env.pop(old))
    # The input, the upsampled image and the 3-channel output beside the features.
    peak += x_bytes + 2 * nbytes(y)
    return peak / (side * side)


# Where the host says how much memory there is (module attributes, so tests can point them at a
# made-up tree).
PROC_MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_available() -> int | None:
    """What this process's memory cgroup (v2, or v1) still allows: the tightest limit along its path
    less what is charged to it, counting the reclaimable page cache (inactive files) as available."""
    try:
        with open(PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: limits on every level of the path
            parts = [p for p in path.split("/") if p]
            folders = [os.path.join(CGROUP_ROOT, *parts[:i]) for i in range(len(parts), -1, -1)]
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            folders = [os.path.join(CGROUP_ROOT, "memory", *[p for p in path.split("/") if p]),
                       os.path.join(CGROUP_ROOT, "memory")]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for folder in folders:
            limit = _read_int(os.path.join(folder, files[0]))
            used = _read_int(os.path.join(folder, files[1]))
            if limit is None or used is None or limit >= 1 << 60:  # v1 says "no limit" with a huge number
                continue
            inactive = 0
            try:
                with open(os.path.join(folder, "memory.stat")) as f:
                    for row in f:
                        key, _, value = row.partition(" ")
                        if key == files[2] and value.strip().isdigit():
                            inactive = int(value)
            except OSError:
                pass
            free = max(limit - used + inactive, 0)
            best = free if best is None else min(best, free)
    return best


def host_available_memory() -> int | None:
    """Bytes the host can give this process without swapping: the kernel's MemAvailable (free
    memory plus the page cache and other memory it can reclaim; not MemFree, which leaves the cache
    out), bounded by the process's memory cgroup (a container's limit). None when neither can be read."""
    available = None
    try:
        with open(PROC_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:  # not Linux (or a kernel before 3.14): free pages are all there is to read
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    limit = _cgroup_available()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on ``device`` may use now: free CUDA memory plus what torch's cache holds, or
    half the host's available memory on CPU (:func:`host_available_memory`; None when that cannot
    be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached))
    available = host_available_memory()
    return None if available is None else int(available * 0.5)


def fits(config, dtype: torch.dtype, shape: tuple[int, ...], budget: int | None) -> bool:
    """Whether a whole-image run of an [N,3,h,w] input should fit in ``budget`` bytes."""
    if budget is None:
        return True
    n, _, h, w = shape
    return n * h * w * config.scale ** 2 * HEADROOM * bytes_per_output_pixel(config, dtype) <= budget


def choose_tile(config, dtype: torch.dtype, batch: int, budget: int, tile_pad: int = DEFAULT_TILE_PAD) -> int:
    """The largest square LR tile whose padded run fits ``budget`` (at least ``MIN_TILE``)."""
    per_lr_pixel = batch * config.scale ** 2 * HEADROOM * bytes_per_output_pixel(config, dtype)
    side = math.isqrt(max(int(budget / per_lr_pixel), 1))
    return max(side - 2 * tile_pad, MIN_TILE)
