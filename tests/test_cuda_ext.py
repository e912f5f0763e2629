"""The CUDA C++ RRCAB pass: its build, its module, its Python wrapper, and (on a GPU) its numbers.

Without a GPU these check that the extension was built wherever nvcc exists, what it exposes, that
the wrapper refuses bad arguments with typed errors before any pointer reaches the kernel, and that
the reference of the pass contract used on the GPU reproduces the RRCAB module. The ``gpu`` tests
compare the kernel with that reference.
"""

from __future__ import annotations

import copy
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import Guarded, assert_close, ca_length, initial_sums, tolerance
from helpers import HAS_CUDA, missing

import msfin_fast
from msfin_fast.engine import cuda_ext
from msfin_fast.errors import ConfigError, DeviceError, InvalidInputError
from msfin_fast.model import RRCAB

ROOT = Path(__file__).resolve().parent.parent


def header_configs() -> list[tuple[int, int, int]]:
    """(channels, groups, CA reduction) of every kernel variant. The (C, G) pairs are read from the
    one line that lists them, MSFIN_FOR_EACH_CONFIG in csrc/rrcab.h (collection must not need a
    build); the built extension and the host emulation are checked against it below. The reduction
    is that of the preset with those groups (MSFIN: G 6, r 5; MSFIN-S: G 4, r 4)."""
    header = (ROOT / "csrc" / "rrcab.h").read_text()
    lines = re.findall(r"^#define MSFIN_FOR_EACH_CONFIG\(X\)(.*)$", header, re.M)
    assert len(lines) == 1, "csrc/rrcab.h must define MSFIN_FOR_EACH_CONFIG(X) on one line"
    pairs = [(int(c), int(g)) for c, g in re.findall(r"X\(\s*(\d+)\s*,\s*(\d+)\s*\)", lines[0])]
    assert pairs, "MSFIN_FOR_EACH_CONFIG lists no (C, G) pair"
    from msfin_fast.config import PRESETS

    reductions = {}
    for cfg in PRESETS.values():
        reductions.setdefault(cfg.groups, set()).add(cfg.reduction)
    assert all(len(reductions.get(g, ())) == 1 for _, g in pairs), (pairs, reductions)
    return [(c, g, next(iter(reductions[g]))) for c, g in pairs]


CONFIGS = header_configs()


def pass_lengths(c: int, g: int, deferred: bool, h: int, w: int) -> dict[str, int]:
    """Reduction lengths of a pass's outputs in the CUDA kernel (exact fp32 FMAs, so tests/bounds.py's
    fp32 term is 2⁻²⁴ per product on the GPU too): the Source, two grouped 3×3 convs of 9·C/G
    products each, the 1×1's C; the sums add h·w pixels. Against the float64 reference that gives
    fp32 ≈ 1e-5 to 4e-5 and fp16 ≈ 1e-3 (max |Δ| / max |reference|)."""
    src = ca_length(c, deferred)
    u = src + 2 * 9 * (c // g) + c
    return {"x_out": src, "u_out": u, "sums": u + h * w}


def check_pass_outputs(dtype, c, g, h, w, deferred, got: dict, want: dict, case: str) -> None:
    """u_out and x_out against the reference, by the storage dtype's bound; the sums (fp32 whatever
    the storage) against fp32's bound, relative to their own largest magnitude."""
    lengths = pass_lengths(c, g, deferred, h, w)
    for name in ("x_out", "u_out", "sums"):
        if got.get(name) is None:
            continue
        bound = tolerance(torch.float32 if name == "sums" else dtype, lengths[name])
        if name == "x_out" and dtype == torch.float32:
            # The CA's 2·C products make the derived bound up to 1.2e-5; this test has always held
            # x_out to 1e-6 (measured at most 6.9e-8), and no bound gets looser.
            bound = min(bound, 1e-6)
        assert_close(got[name], want[name], bound, f"{case}: {name}")


def nvcc_present() -> bool:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return True
    return shutil.which("nvcc") is not None


EXTENSION_EXPECTED = (nvcc_present() and os.environ.get("MSFIN_NO_CUDA_EXT") != "1"
                      and os.environ.get("MSFIN_CUDA_EXT", "auto") != "0")


@pytest.fixture(scope="module")
def ext():
    if not cuda_ext.built():
        message = f"msfin_fast._C is not built: {cuda_ext.extension_problem()}"
        if EXTENSION_EXPECTED:
            message = "nvcc is present, so the install must build the extension; " + message
        missing(message)
    return cuda_ext._C


@pytest.fixture
def gpu_ext():
    """For the tests that run the kernel on a GPU (marked ``gpu``: skipped without CUDA by conftest).
    With CUDA present, an extension that is missing or cannot run is a failure that says why, never
    a skip: a GPU run must not turn green by testing nothing."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not cuda_ext.available():
        missing(f"the CUDA extension cannot run the kernel here: {cuda_ext.extension_problem()}")
    return cuda_ext._C


def make_block(channels: int, groups: int, reduction: int, seed: int = 0) -> RRCAB:
    torch.manual_seed(seed)
    block = RRCAB(channels, groups, reduction, num_steps=1)
    with torch.no_grad():  # non-zero biases everywhere, so a dropped bias shows
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-0.2, 0.2)
    return block.eval()


# ---- the reference of the pass contract (NHWC in and out, computed in float64) ----------------------


def ca_scale(ca_block: RRCAB, sums: torch.Tensor, hw: int) -> torch.Tensor:
    squeeze, excite = ca_block.body[5].conv_du[0], ca_block.body[5].conv_du[2]
    c, cr = excite.out_channels, squeeze.out_channels
    mean = sums.double() / hw
    hidden = F.relu(mean @ squeeze.weight.double().reshape(cr, c).t() + squeeze.bias.double())
    return torch.sigmoid(hidden @ excite.weight.double().reshape(c, cr).t() + excite.bias.double())


def reference_pass(block: RRCAB, t, *, u=None, sums_in=None, ca=None, e1=None, e2=None):
    """(x, u_out, sums_out) of one pass as the contract defines it, rounded where the kernel rounds."""
    dtype = t.dtype
    conv1, conv2, conv3 = block.body[0], block.body[2], block.body[4]
    x = t.double()
    if u is not None:
        x = x + ca_scale(ca, sums_in, t.shape[1] * t.shape[2])[:, None, None, :] * u.double()
    for e in (e1, e2):
        if e is not None:
            x = x + e.double()
    x = x.to(dtype)
    xn = x.double().permute(0, 3, 1, 2)
    g = conv1.groups
    a = F.relu(F.conv2d(xn, conv1.weight.double(), conv1.bias.double(), padding=1, groups=g)).to(dtype).double()
    h = F.relu(F.conv2d(a, conv2.weight.double(), conv2.bias.double(), padding=1, groups=g)).to(dtype).double()
    u_out = F.conv2d(h, conv3.weight.double(), conv3.bias.double())
    return x, u_out.permute(0, 2, 3, 1).to(dtype), u_out.sum(dim=(2, 3)).float()


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def test_reference_pass_reproduces_the_rrcab_module():
    # Two passes with the CA deferred to the consumer are the module's two steps: what the GPU tests
    # compare the kernel with is the network, not a guess.
    block = make_block(24, 6, 5).double()
    t = torch.randn(2, 24, 11, 13, dtype=torch.float64) * 3
    x1, u1, s1 = reference_pass(block, nhwc(t))
    x2, u2, s2 = reference_pass(block, x1, u=u1, sums_in=s1, ca=block)
    out = x2 + ca_scale(block, s2, 11 * 13)[:, None, None, :] * u2
    with torch.no_grad():
        expected = nhwc(block(t))
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x1, nhwc(t))


# ---- the module ------------------------------------------------------------------------------------


def test_extension_absence_is_reported_not_raised():
    if cuda_ext.built():
        assert cuda_ext.compiled_archs()
        return
    assert not cuda_ext.available()
    assert "not built" in cuda_ext.extension_problem()
    assert cuda_ext.compiled_archs() == []


def test_module_exposes_the_pass_and_what_it_was_built_for(ext):
    for name in ("rrcab_pass", "version", "compiled_archs", "supported_configs", "device_status",
                 "device_count", "runtime_version", "driver_version", "smem_bytes"):
        assert callable(getattr(ext, name)), name
    assert ext.version() == msfin_fast.__version__
    archs = ext.compiled_archs()
    if "MSFIN_CUDA_ARCHS" not in os.environ:
        assert archs == ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    assert [tuple(c) for c in ext.supported_configs()] == [(c, g) for c, g, _ in CONFIGS]
    assert ext.runtime_version() >= 11000


def embedded_kernel_archs(path: Path) -> list[int]:
    """SM versions of the CUDA machine-code ELF images (e_machine 190) in a shared library that hold
    the RRCAB kernel. nvcc 13 keeps them uncompressed in the fat binary, with the SM version in bits
    8-15 of e_flags (older toolkits put it in bits 0-7); an image ends with its section headers."""
    data = path.read_bytes()
    archs = []
    for match in re.finditer(rb"\x7fELF", data):
        i = match.start()
        if i == 0 or int.from_bytes(data[i + 18:i + 20], "little") != 190:
            continue
        flags = int.from_bytes(data[i + 48:i + 52], "little")
        shoff = int.from_bytes(data[i + 40:i + 48], "little")
        shentsize, shnum = (int.from_bytes(data[i + k:i + k + 2], "little") for k in (58, 60))
        if b"rrcab_pass_kernel" in data[i:i + shoff + shentsize * shnum]:
            archs.append(flags & 0xFF if (flags & 0xFF) >= 20 else (flags >> 8) & 0xFF)
    return archs


def test_module_holds_machine_code_for_every_target_it_lists(ext):
    found = embedded_kernel_archs(Path(ext.__file__))
    listed = [int(a[3:]) for a in ext.compiled_archs() if a.startswith("sm_")]
    # One image per target from each of the two kernel units (fp16 and fp32 variants).
    assert sorted(found) == sorted(listed * 2), (found, listed)
    ptx = [a for a in ext.compiled_archs() if a.startswith("compute_")]
    data = Path(ext.__file__).read_bytes()
    for arch in ptx:
        assert f".target sm_{arch[8:]}".encode() in data, arch


@pytest.mark.parametrize("dtype_code", [0, 1])
def test_every_variant_fits_the_smallest_shared_memory_of_its_targets(ext, dtype_code):
    for c, g, _ in CONFIGS:
        assert 0 < ext.smem_bytes(dtype_code, c, g) <= 99 * 1024, (c, g)
    assert ext.smem_bytes(dtype_code, 40, 4) == 0


def test_device_status_without_a_gpu_is_an_answer_not_a_crash(ext):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    count, why = ext.device_status()
    assert count == 0 and why
    assert ext.device_count() == 0
    assert not cuda_ext.available()
    assert "no" in cuda_ext.extension_problem()


def test_the_binding_refuses_missing_pointers_before_launching(ext):
    args = dict(dtype_code=0, N=1, H=4, W=4, C=24, G=6, CR=0, t=0, u=0, sums_in=0, ca_w1=0, ca_b1=0,
                ca_w2=0, ca_b2=0, e1=0, e2=0, x_out=0, u_out=0, sums_out=0, w1=0, b1=0, w2=0, b2=0,
                w3t=0, b3=0, device=0, stream=0)
    with pytest.raises(ValueError, match="required"):
        ext.rrcab_pass(**args)
    with pytest.raises(ValueError, match="dtype_code"):
        ext.rrcab_pass(**dict(args, dtype_code=2))


def test_pure_python_install_reports_the_backend_unavailable(tmp_path):
    # What a machine without nvcc gets: the package imports, the backend says why it cannot run.
    code = (
        "import sys\n"
        "sys.modules['msfin_fast._C'] = None  # import msfin_fast._C now fails as if never built\n"
        "from msfin_fast.engine import cuda_ext as cb\n"
        "s = cb.status()\n"
        "print(cb.built(), cb.available(), s.available, s.detail)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False False False the CUDA extension msfin_fast._C is not built"), out.stdout


# ---- the wrapper's checks (no GPU needed: they run before anything touches a pointer) -------------


@pytest.fixture(scope="module")
def packed_cpu():
    return cuda_ext.pack_block(make_block(24, 6, 5), torch.float16, "cpu")


def cpu_args(n=2, h=5, w=7, c=24, dtype=torch.float16):
    return dict(
        t=torch.zeros(n, h, w, c, dtype=dtype),
        u_out=torch.zeros(n, h, w, c, dtype=dtype),
        sums_out=torch.zeros(n, c),
    )


def test_packing_lays_weights_out_as_the_kernel_reads_them():
    block = make_block(32, 4, 4)
    p = cuda_ext.pack_block(block, "fp32", "cpu")
    w1, w3 = block.body[0].weight, block.body[4].weight
    cg = 8
    for g, ci, dy, dx, co in [(0, 0, 0, 0, 0), (1, 3, 2, 1, 5), (3, 7, 1, 2, 7), (2, 5, 0, 2, 1)]:
        assert p.w1[g, ci, dy, dx, co] == w1[g * cg + co, ci, dy, dx]
    assert torch.equal(p.w3t, w3[:, :, 0, 0].t())
    assert p.ca.squeeze == 8 and p.ca.channels == 32
    assert p.w1.is_contiguous() and p.w1.dtype == torch.float32
    assert p.dtype == torch.float32 and (p.channels, p.groups) == (32, 4)


def test_packing_refuses_what_has_no_kernel(ext):
    """(40, 4) is not in the extension's own list (the only place that lists what it compiles)."""
    assert (40, 4) not in cuda_ext.supported_configs()
    with pytest.raises(ConfigError, match="40 channels"):
        cuda_ext.pack_block(RRCAB(40, 4, 4, 1), torch.float16, "cpu")
    with pytest.raises(ConfigError, match="fp16 or fp32"):
        cuda_ext.pack_block(make_block(24, 6, 5), torch.bfloat16, "cpu")
    with pytest.raises(ConfigError, match="RRCAB"):
        cuda_ext.pack_block(torch.nn.Conv2d(3, 3, 1), torch.float16, "cpu")


def test_cpu_tensors_are_refused_with_a_clear_error(packed_cpu):
    with pytest.raises(InvalidInputError, match=r"t is on cpu; the CUDA backend runs on CUDA tensors"):
        cuda_ext.rrcab_pass(packed_cpu, **cpu_args())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(t=a["t"].float()), r"t has dtype torch.float32, expected torch.float16"),
        (lambda a: a.update(t=torch.zeros(2, 5, 7, 16, dtype=torch.float16)), r"\[N, H, W, 24\]"),
        (lambda a: a.update(t=torch.zeros(5, 7, 24, dtype=torch.float16)), r"\[N, H, W, 24\]"),
        (lambda a: a.update(t=torch.zeros(2, 0, 7, 24, dtype=torch.float16)), "zero-size"),
        (lambda a: a.update(t=torch.zeros(2, 24, 5, 7, dtype=torch.float16).permute(0, 2, 3, 1)),
         "not contiguous"),
        (lambda a: a.update(u_out=torch.zeros(2, 5, 8, 24, dtype=torch.float16)),
         r"u_out has shape \(2, 5, 8, 24\), expected \(2, 5, 7, 24\)"),
        (lambda a: a.update(sums_out=torch.zeros(2, 24, dtype=torch.float16)), "sums_out has dtype"),
        (lambda a: a.update(sums_out=torch.zeros(24)), r"sums_out has shape \(24,\)"),
        (lambda a: a.update(u=torch.zeros(2, 5, 7, 24, dtype=torch.float16)), "u needs sums_in"),
        (lambda a: a.update(sums_in=torch.zeros(2, 24)), "go with u"),
        (lambda a: a.update(e1=torch.zeros(2, 5, 7, 24)), "e1 has dtype"),
        (lambda a: a.update(x_out=torch.zeros(1, 5, 7, 24, dtype=torch.float16)), "x_out has shape"),
        (lambda a: a.update(u_out=None), "u_out is required"),
        (lambda a: a.update(t=[[0.0]]), "t must be a torch.Tensor"),
    ],
)
def test_bad_arguments_are_refused_by_name(packed_cpu, change, message):
    args = cpu_args()
    change(args)
    with pytest.raises(InvalidInputError, match=message):
        cuda_ext.rrcab_pass(packed_cpu, **args)


def test_outputs_may_not_overlap_inputs(packed_cpu):
    args = cpu_args()
    with pytest.raises(InvalidInputError, match="x_out overlaps t"):
        cuda_ext.rrcab_pass(packed_cpu, x_out=args["t"], **args)
    buf = torch.zeros(2 * 2 * 5 * 7 * 24, dtype=torch.float16)
    u_out, x_out = buf.view(2, 2, 5, 7, 24)
    args.update(u_out=u_out)
    with pytest.raises(InvalidInputError, match="x_out overlaps u_out"):
        cuda_ext.rrcab_pass(packed_cpu, x_out=buf[8:8 + x_out.numel()].view(x_out.shape), **args)


def test_misaligned_views_are_refused(packed_cpu):
    args = cpu_args()
    buf = torch.zeros(args["t"].numel() + 1, dtype=torch.float16)
    args.update(t=buf[1:].view(args["t"].shape))
    with pytest.raises(InvalidInputError, match="t is not 16-byte aligned"):
        cuda_ext.rrcab_pass(packed_cpu, **args)


def test_unchecked_call_without_a_usable_gpu_is_a_device_error(packed_cpu):
    if cuda_ext.available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(DeviceError, match="not built|no CUDA driver|no usable GPU|newer driver"):
        cuda_ext.rrcab_pass(packed_cpu, **cpu_args(), check=False)


def test_ca_must_match_the_activations(packed_cpu):
    args = cpu_args()
    other = cuda_ext.pack_block(make_block(16, 4, 4), torch.float16, "cpu")
    args.update(u=torch.zeros(2, 5, 7, 24, dtype=torch.float16), sums_in=torch.zeros(2, 24), ca=other)
    with pytest.raises(InvalidInputError, match="ca has 16 channels, the activations 24"):
        cuda_ext.rrcab_pass(packed_cpu, **args)


def test_packed_weights_must_come_from_pack_rrcab():
    with pytest.raises(InvalidInputError, match="pack_block"):
        cuda_ext.rrcab_pass(object(), **cpu_args())


def test_backend_report_says_what_was_built():
    status = cuda_ext.status()
    assert status.available == cuda_ext.available()
    if cuda_ext.built():
        assert "built for sm_" in status.detail
    else:
        assert "not built" in status.detail


# ---- the kernel's source run on the CPU (one OS thread per CUDA thread) ----------------------------


class EmulatedParams(ctypes.Structure):
    # msfin::PassParams, field for field.
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "t", "u", "e1", "e2", "sums_in", "ca_w1", "ca_b1", "ca_w2", "ca_b2", "x_out", "u_out", "sums_out",
        "w1", "b1", "w2", "b2", "w3t", "b3")] + [(name, ctypes.c_int) for name in ("N", "H", "W", "CR")]


def cuda_include_dir() -> str | None:
    nvcc = shutil.which("nvcc")
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            nvcc = os.path.join(os.environ[env], "bin", "nvcc")
    if nvcc is None or not os.access(nvcc, os.X_OK):
        return None
    probe = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)
    match = re.search(r'INCLUDES="-I([^"]+)"', probe.stdout + probe.stderr)
    return match.group(1).strip() if match else None


def host_build_missing(what: str, include: str | None, cxx: str | None) -> str:
    """What is missing to build ``what`` on the host, by name."""
    lacking = [name for name, found in (("nvcc (for the CUDA headers)", include), ("g++", cxx)) if found is None]
    return f"{what} cannot be built: {' and '.join(lacking)} not found"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    include, cxx = cuda_include_dir(), shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        missing(host_build_missing("the host emulation of csrc/", include, cxx))
    lib = tmp_path_factory.mktemp("emulation") / "rrcab_host.so"
    subprocess.run(
        [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{include}", f"-I{ROOT / 'csrc'}",
         "-o", str(lib), str(ROOT / "csrc" / "host_emulation" / "rrcab_host.cpp")],
        check=True, capture_output=True, text=True,
    )
    so = ctypes.CDLL(str(lib))
    assert so.emulate_params_size() == ctypes.sizeof(EmulatedParams)
    count = so.msfin_supported_configs(None, 0)  # the emulation's own list, from the same macro
    listed = (ctypes.c_int * (2 * count))()
    assert so.msfin_supported_configs(listed, count) == count
    assert [(listed[2 * i], listed[2 * i + 1]) for i in range(count)] == [(c, g) for c, g, _ in CONFIGS]
    so.emulate_rrcab_pass.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(EmulatedParams)]
    return so


def emulate_pass(so, packed, t, *, u=None, sums_in=None, ca=None, e1=None, e2=None, x_out=None, u_out,
                 sums_out):
    def ptr(x):
        return None if x is None else x.data_ptr()

    n, h, w, c = t.shape
    cw = ca.ca if ca is not None else None
    params = EmulatedParams(
        t=ptr(t), u=ptr(u), e1=ptr(e1), e2=ptr(e2), sums_in=ptr(sums_in),
        ca_w1=ptr(cw.w1 if cw else None), ca_b1=ptr(cw.b1 if cw else None),
        ca_w2=ptr(cw.w2 if cw else None), ca_b2=ptr(cw.b2 if cw else None),
        x_out=ptr(x_out), u_out=ptr(u_out), sums_out=ptr(sums_out),
        w1=ptr(packed.w1), b1=ptr(packed.b1), w2=ptr(packed.w2), b2=ptr(packed.b2),
        w3t=ptr(packed.w3t), b3=ptr(packed.b3), N=n, H=h, W=w, CR=cw.squeeze if cw else 0,
    )
    code = 1 if packed.dtype == torch.float16 else 0
    assert so.emulate_rrcab_pass(code, c, packed.groups, ctypes.byref(params)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("c, g, r", CONFIGS, ids=[f"C{c}G{g}" for c, g, _ in CONFIGS])
def test_kernel_source_matches_the_reference_on_the_cpu(emulator, dtype, c, g, r):
    # Like the GPU test, smaller: an image inside one tile and ones across ragged tiles, with every
    # optional input, with none, and with u alone; outputs start as NaN inside NaN guard bands.
    block, producer = make_block(c, g, r), make_block(c, g, r, seed=1)
    packed = cuda_ext.pack_block(block, dtype, "cpu")
    ca = cuda_ext.pack_block(producer, dtype, "cpu")
    gen = torch.Generator().manual_seed(c)
    for (n, h, w), inputs in (((1, 5, 3), "u e1 e2 x_out"), ((2, 19, 37), "x_out"), ((1, 13, 29), "u")):
        def act(scale=2.0):
            return (torch.randn(n, h, w, c, generator=gen) * scale).to(dtype)

        t = act()
        kwargs, ref_kwargs = {}, {}
        if "u" in inputs.split():
            u, sums_in = act(), torch.randn(n, c, generator=gen) * h * w
            kwargs.update(u=u, sums_in=sums_in, ca=ca)
            ref_kwargs.update(u=u, sums_in=sums_in, ca=producer)
        if "e1" in inputs:
            e1, e2 = act(0.5), act(0.5)
            kwargs.update(e1=e1, e2=e2)
            ref_kwargs.update(e1=e1, e2=e2)
        out = Guarded("cpu")
        x_out, u_out = out.new("x_out", (n, h, w, c), dtype), out.new("u_out", (n, h, w, c), dtype)
        sums0 = initial_sums(n, c, h * w, "cpu", gen)
        sums_out = out.new("sums_out", (n, c), torch.float32, fill=sums0)
        emulate_pass(emulator, packed, t, x_out=x_out if "x_out" in inputs else None, u_out=u_out,
                     sums_out=sums_out, **kwargs)
        with torch.no_grad():
            x_ref, u_ref, sums_ref = reference_pass(block, t, **ref_kwargs)
        case = f"{dtype} C={c} {n}x{h}x{w} with {inputs}"
        out.check()
        assert not torch.isnan(u_out).any(), case
        if "x_out" not in inputs:
            assert torch.isnan(x_out).all(), "x_out was not asked for, yet written"
        check_pass_outputs(dtype, c, g, h, w, "u" in inputs.split(),
                           dict(x_out=x_out if "x_out" in inputs else None, u_out=u_out, sums=sums_out),
                           dict(x_out=x_ref, u_out=u_ref, sums=sums_ref + sums0), case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sanitizer, flags",
    [("ThreadSanitizer", ["-fsanitize=thread"]),
     ("AddressSanitizer", ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"])],
    ids=["races", "bounds"],
)
def test_kernel_source_is_clean_under_host_sanitizers(tmp_path, sanitizer, flags):
    # The CPU stand-ins for compute-sanitizer's racecheck and memcheck: a shared-memory access not
    # ordered by __syncthreads is a data race between the emulated threads, and shared memory is a
    # heap buffer of exactly the launch's size, so an access outside it, or outside any tensor, trips
    # AddressSanitizer. About 20 s on two cores.
    include, cxx = cuda_include_dir(), shutil.which("g++")
    if include is None or cxx is None:
        missing(host_build_missing("the host sanitizers", include, cxx))
    exe = tmp_path / "sanitize_host"
    subprocess.run(
        [cxx, "-std=c++20", "-O1", "-g", "-pthread", *flags, f"-I{include}", f"-I{ROOT / 'csrc'}",
         "-o", str(exe), str(ROOT / "csrc" / "host_emulation" / "sanitize_host.cpp")],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0")
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and sanitizer not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count(" ran\n") == 2 * len(CONFIGS)


# ---- the kernel against the reference (GPU) --------------------------------------------------------


def run_case(c, g, r, dtype, n, h, w, with_inputs, seed=0):
    block = make_block(c, g, r, seed).cuda()
    producer = make_block(c, g, r, seed + 1).cuda()
    packed = cuda_ext.pack_block(block, dtype, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def act(scale=2.0):
        return (torch.randn(n, h, w, c, device="cuda", generator=gen) * scale).to(dtype)

    t = act()
    kwargs, ref_kwargs = {}, {}
    if with_inputs:
        u = act()
        sums_in = torch.randn(n, c, device="cuda", generator=gen) * h * w
        e1, e2 = act(0.5), act(0.5)
        kwargs = dict(u=u, sums_in=sums_in, ca=cuda_ext.pack_block(producer, dtype, "cuda"), e1=e1, e2=e2)
        ref_kwargs = dict(u=u, sums_in=sums_in, ca=producer, e1=e1, e2=e2)
    out = Guarded("cuda")
    u_out, x_out = out.new("u_out", (n, h, w, c), dtype), out.new("x_out", (n, h, w, c), dtype)
    sums0 = initial_sums(n, c, h * w, "cuda", gen)
    sums_out = out.new("sums_out", (n, c), torch.float32, fill=sums0)
    cuda_ext.rrcab_pass(packed, t, x_out=x_out, u_out=u_out, sums_out=sums_out, **kwargs)
    torch.cuda.synchronize()
    with torch.no_grad():
        x_ref, u_ref, sums_ref = reference_pass(block, t, **ref_kwargs)
    return dict(outputs=out, got=dict(x_out=x_out, u_out=u_out, sums=sums_out),
                want=dict(x_out=x_ref, u_out=u_ref, sums=sums_ref + sums0))


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("c, g, r", CONFIGS, ids=[f"C{c}G{g}" for c, g, _ in CONFIGS])
@pytest.mark.parametrize("n, h, w", [(1, 13, 29), (3, 37, 41)], ids=["1x13x29", "3x37x41"])
@pytest.mark.parametrize("with_inputs", [False, True], ids=["t", "t+s*u+e1+e2"])
def test_kernel_matches_the_reference(dtype, c, g, r, n, h, w, with_inputs):
    res = run_case(c, g, r, dtype, n, h, w, with_inputs)
    res["outputs"].check()
    assert not torch.isnan(res["got"]["u_out"]).any() and not torch.isnan(res["got"]["x_out"]).any()
    check_pass_outputs(dtype, c, g, h, w, with_inputs, res["got"], res["want"], f"{dtype} C={c} {n}x{h}x{w}")


def check_two_passes_of_the_pretrained_block(pretrained, device, run_pass):
    """MSFIN's first full-resolution block, run as the engine runs it: pass 1 on t, pass 2 on
    t + s1·u1 with this block's own CA, and the last CA applied by the consumer; against the
    module in float64. Bound: two passes' reductions plus the consumer's CA (tests/bounds.py), fp32."""
    model = pretrained("msfin-x4")
    block = model.ds0_body
    packed = cuda_ext.pack_block(block, torch.float32, device)
    torch.manual_seed(0)
    t_nchw = torch.randn(2, 24, 31, 45) * 8
    with torch.no_grad():
        expected = nhwc(copy.deepcopy(block).double()(t_nchw.double()))
    t = nhwc(t_nchw).to(device)
    u1, s1 = torch.empty_like(t), torch.zeros(2, 24, device=device)
    run_pass(packed, t, u_out=u1, sums_out=s1)
    x2, u2, s2 = torch.empty_like(t), torch.empty_like(t), torch.zeros(2, 24, device=device)
    run_pass(packed, t, u=u1, sums_in=s1, ca=packed, x_out=x2, u_out=u2, sums_out=s2)
    out = x2.cpu().double() + ca_scale(block, s2.cpu(), 31 * 45)[:, None, None, :] * u2.cpu().double()
    one = pass_lengths(24, 6, True, 31, 45)
    bound = tolerance(torch.float32, one["u_out"] + one["sums"] + ca_length(24, True))
    assert_close(out, expected, bound, "two passes")


def test_two_passes_are_the_pretrained_block_on_the_cpu(emulator, pretrained):
    check_two_passes_of_the_pretrained_block(pretrained, "cpu", lambda *a, **k: emulate_pass(emulator, *a, **k))


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_ext")
def test_two_passes_are_the_pretrained_block(pretrained):
    check_two_passes_of_the_pretrained_block(pretrained, "cuda", cuda_ext.rrcab_pass)


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_ext")
def test_pass_runs_on_the_current_stream_and_in_a_cuda_graph():
    c, g, r = 24, 6, 5
    packed = cuda_ext.pack_block(make_block(c, g, r), torch.float16, "cuda")
    t = (torch.randn(1, 20, 24, c, device="cuda") * 2).half()
    u_out, sums_out = torch.empty_like(t), torch.zeros(1, c, device="cuda")
    expected_u, expected_sums = torch.empty_like(t), torch.zeros(1, c, device="cuda")
    cuda_ext.rrcab_pass(packed, t, u_out=expected_u, sums_out=expected_sums)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture wants
        cuda_ext.rrcab_pass(packed, t, u_out=u_out, sums_out=sums_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sums_out.zero_()
        cuda_ext.rrcab_pass(packed, t, u_out=u_out, sums_out=sums_out)
    u_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(u_out, expected_u)
    assert torch.allclose(sums_out, expected_sums, rtol=1e-5, atol=1e-3)


# One sanitizer run must fit well inside one GPU command (at most 10 minutes for everything).
SANITIZER_TIMEOUT_S = 170
UNSUPPORTED = ("Device not supported", "device is not supported")


def sanitizer_verdict(returncode: int | None, output: str) -> tuple[str, str]:
    """("pass" | "skip" | "fail", why) for a compute-sanitizer run; ``returncode`` None: timed out.

    Some hosts (sandboxed GPUs) refuse the sanitizer outright ("Device not supported", then error 999
    at the first allocation): that says nothing about the kernel, so it is a skip that says so.
    """
    for phrase in UNSUPPORTED:
        if phrase in output:
            line = next(line for line in output.splitlines() if phrase in line).strip()
            return "skip", f"compute-sanitizer cannot run on this host: {line}"
    if returncode is None:
        return "fail", f"compute-sanitizer did not finish within {SANITIZER_TIMEOUT_S} s"
    if returncode != 0:
        return "fail", f"exit status {returncode}: " + output[-4000:]
    if "ERROR SUMMARY: 0 errors" not in output:
        return "fail", "no 'ERROR SUMMARY: 0 errors' line: " + output[-4000:]
    return "pass", ""


@pytest.mark.parametrize("returncode, output, verdict", [
    (0, "========= COMPUTE-SANITIZER\nok: every variant ran\n========= ERROR SUMMARY: 0 errors\n", "pass"),
    (3, "========= Invalid __global__ write of size 2 bytes\n========= ERROR SUMMARY: 4 errors\n", "fail"),
    (0, "ok: every variant ran\n", "fail"),
    (None, "", "fail"),
    (1, "========= Error: Device not supported\n========= Error: Target application returned an error\n"
        "RuntimeError: CUDA error 999\n", "skip"),
])
def test_sanitizer_verdicts(returncode, output, verdict):
    got, why = sanitizer_verdict(returncode, output)
    assert got == verdict, why
    if verdict == "skip":
        assert "Device not supported" in why


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_ext")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        missing("compute-sanitizer is not on PATH (it ships with the CUDA toolkit)")
    # Its own process group, so that a timeout also ends the Python program it runs.
    proc = subprocess.Popen(
        [sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(ROOT / "csrc" / "sanitize_rrcab.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=SANITIZER_TIMEOUT_S)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        returncode = None
    verdict, why = sanitizer_verdict(returncode, output)
    if verdict == "skip":
        pytest.skip(why)
    assert verdict == "pass", why
