"""Self-ensemble ×8 (the paper's MSFIN+): the 8 flips and 90° rotations in one batched forward.

Every variant is one of {identity, flip W, flip H, flip both}, optionally followed by a transpose
of H and W (the 4 rotations and 4 reflections of the square). Channel attention pools per sample,
so running the variants as one batch gives each exactly what it would get alone.

A transpose swaps h and w, so for a non-square image the 8 variants cannot share one tensor. Padding
to a square would change every output (the convs see the padding at the border and the attention
means include it), so it would no longer be MSFIN+. Instead a non-square input runs as two
batches of 4N, one per orientation; a square input runs as one batch of 8N. The outputs are mapped
back and averaged in float32 (unclamped, as the authors average them).
"""

from __future__ import annotations

from typing import Callable

import torch

from .model import check_input

_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _forward_variant(x: torch.Tensor, flip: tuple[int, ...], transpose: bool) -> torch.Tensor:
    x = x.flip(flip) if flip else x
    return x.transpose(-2, -1) if transpose else x


def _inverse_variant(y: torch.Tensor, flip: tuple[int, ...], transpose: bool) -> torch.Tensor:
    y = y.transpose(-2, -1) if transpose else y
    return y.flip(flip) if flip else y


def variants() -> list[tuple[tuple[int, ...], bool]]:
    """The 8 (flip dims, transpose) pairs, the 4 untransposed first."""
    return [(flip, transpose) for transpose in (False, True) for flip in _FLIPS]


@torch.inference_mode()
def self_ensemble(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``T⁻¹(forward(T(x)))`` over the 8 transforms T, as float32.

    ``forward`` maps [B,3,h,w] → [B,3,s·h,s·w] (a model, or a tiled run of one). It is called once
    with B = 8N for square images and twice with B = 4N otherwise.
    """
    check_input(x, check_finite=False)
    n, _, h, w = x.shape
    pairs = variants()
    groups = [pairs] if h == w else [pairs[:4], pairs[4:]]
    total = None
    for group in groups:
        batch = torch.cat([_forward_variant(x, f, t) for f, t in group], dim=0)
        out = forward(batch).float()
        for i, (f, t) in enumerate(group):
            back = _inverse_variant(out[i * n:(i + 1) * n], f, t)
            total = back.clone() if total is None else total.add_(back)
    return total.div_(len(pairs))
