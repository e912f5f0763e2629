"""The host-side shape of a deferred value, importable without Triton (see source.py).

``Source`` is the engine's one type for a deferred value (msfin_fast/engine/source.py); the kernels
read its ``ca`` (the producer's :class:`CAWeights`).
"""

from typing import NamedTuple

import torch

from ..engine.source import Source  # noqa: F401  (the kernels' input type)

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
