"""What a run leaves on disk and reads back: ``train_state.pt`` (written atomically, with the RNG
states), and ``log.csv`` (rows past a resumed step dropped)."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from ..fileio import atomic_write
from .config import LOG_COLUMNS, STATE_FILE


STATE_FORMAT = 1


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_train_state(out: str | Path) -> dict:
    """The resume state of the run in folder ``out`` (weights-only loading)."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: no training state to resume from; start a run without resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on garbage; all mean "not loadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"{path}: cannot be loaded (corrupt or truncated?): {first[:160]}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a training state written by this version of msfin_fast")
    return state


class CsvLog:
    """``log.csv`` (step, loss, lr, val_psnr); rows past the resumed step are dropped first."""

    def __init__(self, path: Path, step: int):
        self.path = path
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
            if rows and tuple(rows[0]) == LOG_COLUMNS and len(kept) == len(rows) - 1:
                return
            self._write([list(LOG_COLUMNS), *kept])
        else:
            self._write([list(LOG_COLUMNS)])

    def _write(self, rows: list[list]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        with atomic_write(self.path) as f:
            f.write(text.getvalue().encode())

    def append(self, step: int, loss: float | None, lr: float, val_psnr: float | None) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(
                [step, "" if loss is None else f"{loss:.6f}", f"{lr:.6e}",
                 "" if val_psnr is None else f"{val_psnr:.4f}"]
            )
