"""Released weights by name: registry, lookup, download, checksum and strict loading.

Lookup order for a preset's file (e.g. ``MSFIN_X4.pt``):
  1. ``$MSFIN_WEIGHTS_DIR/<file>``
  2. the torch hub cache, ``<torch.hub.get_dir()>/checkpoints/<file>``
  3. download from the upstream repository into the hub cache (unless ``MSFIN_OFFLINE=1``).
A file found by name must match the registered SHA-256. Files are loaded with
``weights_only=True`` onto the CPU (the released files were saved from CUDA tensors).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .config import PRESETS, MSFINConfig, get_config
from .devices import resolve_device
from .errors import WeightsError
from .fileio import atomic_write
from .model import MSFIN

# The upstream commit that added the released files; pinning it keeps the URLs immutable.
UPSTREAM_COMMIT = "faf809547c6faa3f66ac6318f4c09622cfb95bd8"
UPSTREAM_BASE = f"https://github.com/wzx0826/MSFIN/raw/{UPSTREAM_COMMIT}/test/model"


@dataclass(frozen=True)
class WeightsEntry:
    preset: str
    filename: str
    sha256: str

    @property
    def url(self) -> str:
        return f"{UPSTREAM_BASE}/{self.filename}"


REGISTRY: dict[str, WeightsEntry] = {
    "msfin-x4": WeightsEntry(
        "msfin-x4", "MSFIN_X4.pt", "339a637d4b2fefd7ee52a553f3729d895381a01c94a68436c75bbf97d5c44345"
    ),
    "msfin-s-x4": WeightsEntry(
        "msfin-s-x4", "MSFIN-S_X4.pt", "ddf9b187e848618a28769b66c7cbe00a54e33887a11b3d284371f26edae2ff91"
    ),
}
assert set(REGISTRY) == set(PRESETS)

_WRAPPER_KEYS = ("state_dict", "model", "params_ema", "params")


def registry_entry(preset: str) -> WeightsEntry:
    get_config(preset)  # raises ConfigError naming the presets
    return REGISTRY[preset]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def candidate_paths(preset: str) -> list[tuple[str, Path]]:
    """Where ``preset``'s file is looked for, in order, as (source, path)."""
    entry = registry_entry(preset)
    candidates = []
    env_dir = os.environ.get("MSFIN_WEIGHTS_DIR")
    if env_dir:
        candidates.append(("MSFIN_WEIGHTS_DIR", Path(env_dir).expanduser() / entry.filename))
    candidates.append(("torch hub cache", hub_checkpoint_dir() / entry.filename))
    return candidates


def locate(preset: str) -> Path | None:
    """The first existing file for ``preset`` (no download, no checksum), or None."""
    for _, path in candidate_paths(preset):
        if path.is_file():
            return path
    return None


def verify(preset: str, path: Path) -> None:
    entry = registry_entry(preset)
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise WeightsError(
            f"{path} is not the released {preset} checkpoint: SHA-256 {actual[:16]}… expected "
            f"{entry.sha256[:16]}…; the file is corrupt, truncated or a different model. "
            "Delete it (it is downloaded again) or pass your own file with weights=/--weights"
        )


def download(preset: str, *, progress: bool | None = None, timeout: float = 60.0) -> Path:
    """Download ``preset``'s file into the hub cache, verify it, and return its path.

    ``progress`` (default: when stderr is a terminal) prints a percentage on stderr.
    """
    entry = registry_entry(preset)
    if progress is None:
        progress = sys.stderr.isatty()
    if os.environ.get("MSFIN_OFFLINE", "") not in ("", "0"):
        raise WeightsError(
            f"{preset}: weights {entry.filename} not found (looked in "
            f"{', '.join(str(p) for _, p in candidate_paths(preset))}) and MSFIN_OFFLINE is set; "
            "set MSFIN_WEIGHTS_DIR to a folder that holds the file"
        )
    target = hub_checkpoint_dir() / entry.filename
    try:
        with atomic_write(target) as out, urllib.request.urlopen(entry.url, timeout=timeout) as resp:
            digest = hashlib.sha256()
            total, done = int(resp.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress and total:
                    print(f"\rdownloading {entry.filename}: {100 * done // total}%", end="",
                          file=sys.stderr, flush=True)
            if progress and total:
                print(file=sys.stderr)
            if digest.hexdigest() != entry.sha256:
                raise WeightsError(
                    f"{preset}: download from {entry.url} has SHA-256 {digest.hexdigest()[:16]}…, "
                    f"expected {entry.sha256[:16]}…; nothing was saved"
                )
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"{preset}: weights {entry.filename} not found locally and the download from "
            f"{entry.url} failed ({reason}); set MSFIN_WEIGHTS_DIR to a folder that holds the file"
        ) from None
    return target


def fetch(preset: str, *, allow_download: bool = True, progress: bool | None = None) -> Path:
    """Path of ``preset``'s verified weights file, downloading it if needed."""
    path = locate(preset)
    if path is not None:
        verify(preset, path)
        return path
    if not allow_download:
        places = ", ".join(str(p) for _, p in candidate_paths(preset))
        raise WeightsError(f"{preset}: weights not found (looked in {places})")
    return download(preset, progress=progress)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely and return a flat state_dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found" if not path.exists() else f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    # torch.save writes a zip archive; files of torch < 1.6 are a pickle (protocol 2 or later).
    if not (head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        raise WeightsError(f"{path} is not a PyTorch checkpoint (neither the zip archive torch.save writes "
                           "nor a pickle); give the .pt/.pth file of a state_dict")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "global" not in str(exc).lower():
            raise WeightsError(f"{path} cannot be loaded as a PyTorch checkpoint (corrupt or truncated?): "
                               f"{(str(exc).strip().splitlines() or ['unreadable pickle'])[0][:160]}") from None
        raise WeightsError(
            f"{path} holds Python objects other than tensors; refused by weights-only loading"
        ) from None
    except Exception as exc:  # torch.load raises many types on garbage; all mean "not loadable"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(
            f"{path} cannot be loaded as a PyTorch checkpoint (corrupt or truncated?): {first_line[:160]}"
        ) from None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: MSFIN, state: Mapping[str, torch.Tensor], preset: str, source: str) -> None:
    """Raise WeightsError naming the mismatched keys unless ``state`` fits ``model`` exactly."""
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [
        f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatches ({_names(wrong_shape, 3)})")
    hint = ""
    head = state.get("head.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 4:
        fits = [p for p, c in PRESETS.items() if c.n_feats == head.shape[0] and p != preset]
        if fits:
            hint = f"; it looks like a {fits[0]} checkpoint (n_feats {head.shape[0]})"
    raise WeightsError(f"{source} does not fit preset {preset!r}: " + "; ".join(parts) + hint)


def check_values(named_tensors, source: str) -> None:
    """Raise WeightsError naming the first tensor that is not floating point or holds NaN/Inf.

    Such a checkpoint loads without complaint and then makes every output NaN, which an image
    writer turns into black: the file is refused here instead.
    """
    for name, tensor in named_tensors:
        if not tensor.is_floating_point():
            raise WeightsError(
                f"{source}: tensor {name!r} has dtype {tensor.dtype}; weights must be floating point "
                "(the file is not a trained MSFIN checkpoint, or was converted wrongly)"
            )
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            kinds = [k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(f(tensor.detach()).any())]
            raise WeightsError(
                f"{source}: tensor {name!r} holds {bad} {'/'.join(kinds)} value(s) of {tensor.numel()}; "
                "the checkpoint is corrupt or came from a diverged training run"
            )


@functools.cache
def state_dict_keys() -> frozenset[str]:
    """The state_dict keys of every MSFIN (the names do not depend on the configuration)."""
    return frozenset(MSFIN(PRESETS["msfin-s-x4"]).state_dict())


def infer_config(state: Mapping[str, torch.Tensor], source: str = "the state_dict") -> MSFINConfig:
    """The configuration a plain MSFIN state_dict was built with, read from its tensors' shapes.

    ``n_feats`` is ``head.weight``'s output width, ``groups`` follows from the first grouped conv of
    ``ds0_body`` (``n_feats / in-channels per group``), and ``reduction`` is the one value that gives
    every channel attention its squeeze width (``C // reduction`` at C = n, 2n and 4n). The
    recurrence (``num_steps``) and the scale leave no trace in the tensors: they come from the preset
    with these shapes (MSFIN ×4: one extra step; MSFIN-S ×4: none), else from MSFINConfig's defaults
    (one extra step, ×4) with a warning. Raises WeightsError when the keys are not MSFIN's.
    """
    expected = state_dict_keys()
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({_names(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys ({_names(unexpected)})"] if unexpected else []
        raise WeightsError(f"{source} is not an MSFIN state_dict: " + "; ".join(parts))
    try:
        n = int(state["head.weight"].shape[0])
        per_group = int(state["ds0_body.body.0.weight"].shape[1])
        groups = n // per_group if per_group and n % per_group == 0 else 0
        squeezes = {c: int(state[f"{name}.body.5.conv_du.0.weight"].shape[0])
                    for c, name in ((n, "ds0_body"), (2 * n, "ds2_rcab"), (4 * n, "ds4_rcab"))}
    except (IndexError, TypeError):
        raise WeightsError(f"{source}: tensors of the wrong rank for MSFIN") from None
    reductions = [r for r in range(1, n + 1) if all(c // r == q for c, q in squeezes.items())]
    if not groups or not reductions:
        raise WeightsError(
            f"{source}: shapes fit no MSFIN (n_feats {n}, {per_group} channels per group, "
            f"channel-attention widths {sorted(squeezes.values())})"
        )
    shapes = dict(n_feats=n, groups=groups, reduction=reductions[0])
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in shapes.items()):
            return preset
    config = MSFINConfig(**shapes)
    warnings.warn(
        f"{source}: n_feats {n}, groups {groups}, reduction {reductions[0]} match no released preset; "
        f"the recurrence and scale are not stored in the weights, so num_steps={config.num_steps} "
        f"and ×{config.scale} are assumed"
    )
    check_state_dict(MSFIN(config), state, "inferred", source)
    return config


def load_pretrained(
    name: str = "msfin-x4",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    weights: str | Path | None = None,
    allow_download: bool = True,
    progress: bool | None = None,
):
    """An MSFIN preset with its released weights, in eval mode, on ``device`` in ``dtype``.

    ``weights`` loads your own checkpoint for the preset's architecture instead of the released
    file (no checksum; keys and shapes must still match exactly). This loads weights only; for the
    fast engine pass the fp32 result to ``msfin_fast.optimize(model, dtype=..., backend=...)``.
    """
    config = get_config(name)
    device = resolve_device(device)  # a DeviceError naming the problem, before any file is read
    path = Path(weights) if weights is not None else fetch(name, allow_download=allow_download, progress=progress)
    state = read_state_dict(path)
    model = MSFIN(config)
    check_state_dict(model, state, name, str(path))
    check_values(((k, state[k]) for k in model.state_dict()), str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
