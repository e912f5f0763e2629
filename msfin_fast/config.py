"""Model configuration and the two released presets.

One frozen dataclass describes an MSFIN; the presets are the ×4 models whose weights the authors
released. Other scales and widths build untrained models for training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class MSFINConfig:
    """Hyper-parameters of one MSFIN network.

    n_feats:    feature width ``n`` of the full-resolution level (2n and 4n on the lower levels).
    groups:     groups of the two 3×3 convs inside every RRCAB.
    reduction:  channel-attention reduction; the squeeze width is ``C // reduction``.
    num_steps:  extra applications of each RRCAB with shared weights (0 = apply once).
    scale:      integer upscaling factor of the bilinear pre-upsampling.
    rgb_range:  value range of input and output pixels (255 for 8-bit images).
    rgb_mean:   per-channel mean removed by ``sub_mean`` and restored by ``add_mean``, in [0, 1].
    """

    n_feats: int = 24
    groups: int = 6
    reduction: int = 5
    num_steps: int = 1
    scale: int = 4
    rgb_range: float = 255.0
    rgb_mean: tuple[float, float, float] = DIV2K_RGB_MEAN

    def __post_init__(self) -> None:
        for field in ("n_feats", "groups", "reduction", "num_steps", "scale"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"MSFINConfig.{field} must be an int, got {value!r}")
        if self.n_feats < 1 or self.groups < 1 or self.reduction < 1 or self.scale < 1:
            raise ConfigError(
                "MSFINConfig needs n_feats, groups, reduction and scale >= 1, got "
                f"n_feats={self.n_feats}, groups={self.groups}, reduction={self.reduction}, "
                f"scale={self.scale}"
            )
        if self.num_steps < 0:
            raise ConfigError(f"MSFINConfig.num_steps must be >= 0, got {self.num_steps}")
        if self.n_feats % self.groups:
            raise ConfigError(
                f"MSFINConfig.n_feats={self.n_feats} is not divisible by groups={self.groups}"
            )
        if self.n_feats // self.reduction < 1:
            raise ConfigError(
                f"MSFINConfig.reduction={self.reduction} leaves no channel-attention width for "
                f"n_feats={self.n_feats}; use reduction <= n_feats"
            )
        if self.rgb_range <= 0:
            raise ConfigError(f"MSFINConfig.rgb_range must be > 0, got {self.rgb_range}")
        if len(self.rgb_mean) != 3:
            raise ConfigError(f"MSFINConfig.rgb_mean needs 3 values, got {self.rgb_mean!r}")

    def replace(self, **changes) -> "MSFINConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, MSFINConfig] = {
    "msfin-x4": MSFINConfig(n_feats=24, groups=6, reduction=5, num_steps=1, scale=4),
    "msfin-s-x4": MSFINConfig(n_feats=16, groups=4, reduction=4, num_steps=0, scale=4),
}


def get_config(name: str) -> MSFINConfig:
    """The configuration of a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
