"""The host-side shape of a deferred value, importable without Triton (see source.py)."""

from typing import NamedTuple

import torch

# The one-launch RRCAB kernel (rrcab_fused.py) runs passes up to this many channels; wider passes
# (quarter and half resolution) exceed the registers of a useful tile and keep two launches.
FUSED_MAX_CHANNELS = 32


class CAWeights(NamedTuple):
    """A block's channel attention, packed (layout in kernels/source.py)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2t: torch.Tensor
    b2: torch.Tensor

    @property
    def padded(self) -> tuple[int, int]:
        """(CP, CRP): channels and squeezed channels, padded to powers of two."""
        return self.w1.shape[1], self.w1.shape[0]


class Source(NamedTuple):
    """``t + CA(u) + e1 + e2``: a value some kernel will finish while reading it."""

    t: torch.Tensor
    u: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    ca: CAWeights | None = None
    e1: torch.Tensor | None = None
    e2: torch.Tensor | None = None

    @property
    def deferred(self) -> bool:
        return self.u is not None

    @property
    def addends(self) -> list[torch.Tensor]:
        return [e for e in (self.e1, self.e2) if e is not None]

    @property
    def is_plain(self) -> bool:
        return self.u is None and self.e1 is None and self.e2 is None
