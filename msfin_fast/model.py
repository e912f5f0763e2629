"""The reference MSFIN, written to be read.

Attribute names are the state_dict keys of the authors' released checkpoints, so
``load_state_dict(torch.load(...), strict=True)`` works on both files. The forward follows the
network as the released weights need it (see docs/results.md, "The network, as the released
weights need it"); for the ×4 presets it
reproduces the authors' outputs. Every faster backend is checked against this module.

Layout: NCHW float tensors, pixels in [0, rgb_range] (0–255 for the presets), RGB order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MSFINConfig, get_config
from .errors import InvalidInputError

# The feature pyramid halves the full-resolution map twice, so the network's internal size must be a
# multiple of 4. ×4 inputs always are; other scales are padded, run, and cropped back.
PYRAMID_MULTIPLE = 4


def conv3x3(c_in: int, c_out: int, *, stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1)


def upsample2(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 conv to 4·c_out channels, then PixelShuffle(2)."""
    return nn.Sequential(conv3x3(c_in, 4 * c_out), nn.PixelShuffle(2))


def downsample2(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Stride-2 3×3 conv c_in→c_mid (biased), LeakyReLU(0.2), 3×3 conv c_mid→c_out (no bias)."""
    return nn.Sequential(
        conv3x3(c_in, c_mid, stride=2), nn.LeakyReLU(0.2), conv3x3(c_mid, c_out, bias=False)
    )


class MeanShift(nn.Conv2d):
    """A 1×1 conv 3→3 initialised to the identity with bias ``sign · rgb_range · mean``.

    It is an ordinary, trainable conv: the released checkpoints hold trained values (weights
    within about 0.03 of the identity), so engines must apply it as a full 3×3 channel mix.
    """

    def __init__(self, rgb_range: float, rgb_mean: tuple[float, float, float], sign: int):
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean))


class ChannelAttention(nn.Module):
    """``u · sigmoid(W2 · ReLU(W1 · mean_HW(u)))`` with a squeeze to ``channels // reduction``."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        squeeze = channels // reduction
        self.conv_du = nn.Sequential(
            conv1x1(channels, squeeze), nn.ReLU(), conv1x1(squeeze, channels), nn.Sigmoid()
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.conv_du(u.mean(dim=(2, 3), keepdim=True))


class RRCAB(nn.Module):
    """Recurrent residual channel-attention block.

    One step is ``t + CA(conv1x1(ReLU(gconv3x3(ReLU(gconv3x3(t))))))``; the step is applied
    ``1 + num_steps`` times with the same weights.
    """

    def __init__(self, channels: int, groups: int, reduction: int, num_steps: int):
        super().__init__()
        self.num_steps = num_steps
        self.body = nn.Sequential(
            conv3x3(channels, channels, groups=groups),
            nn.ReLU(),
            conv3x3(channels, channels, groups=groups),
            nn.ReLU(),
            conv1x1(channels, channels),
            ChannelAttention(channels, reduction),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for _ in range(1 + self.num_steps):
            t = t + self.body(t)
        return t


class Down2(nn.Module):
    """Level 1 → level 2: half resolution, n → 2n channels (``ds2_down``)."""

    def __init__(self, n: int):
        super().__init__()
        self.down = downsample2(n, n, 2 * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class Down4(nn.Module):
    """Level 1 → level 3: quarter resolution, n → 2n → 4n channels (``ds4_down``)."""

    def __init__(self, n: int):
        super().__init__()
        self.down1 = downsample2(n, n, 2 * n)
        self.down2 = downsample2(2 * n, 4 * n, 4 * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down2(self.down1(x))


class Up2(nn.Module):
    """Level 2 → level 1: 2n → n channels by pixel shuffle (``ds2_up``)."""

    def __init__(self, n: int):
        super().__init__()
        self.up = upsample2(2 * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def check_input(x: torch.Tensor, dtype: torch.dtype | None = None, *, check_finite: bool = True) -> None:
    """Raise InvalidInputError unless ``x`` is a finite float [N, 3, h, w] tensor with h, w >= 1."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"expected a torch.Tensor of shape [N, 3, h, w], got {type(x).__name__}")
    if x.dim() != 4:
        raise InvalidInputError(
            f"expected a 4-D tensor [N, 3, h, w], got shape {tuple(x.shape)}; "
            "add a batch dimension with x[None] for a single image"
        )
    n, c, h, w = x.shape
    if c != 3:
        raise InvalidInputError(
            f"expected 3 RGB channels, got {c} (shape {tuple(x.shape)}); "
            "replicate greyscale with x.expand(-1, 3, -1, -1) and drop alpha before the model"
        )
    if n == 0 or h == 0 or w == 0:
        raise InvalidInputError(f"empty input: shape {tuple(x.shape)} has a zero-size dimension")
    if not x.is_floating_point():
        raise InvalidInputError(
            f"expected a floating-point tensor with pixels in [0, 255], got dtype {x.dtype}; "
            "convert with x.float()"
        )
    if dtype is not None and x.dtype != dtype:
        raise InvalidInputError(f"input dtype {x.dtype} does not match the model's dtype {dtype}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise InvalidInputError("input contains NaN or Inf values")


class MSFIN(nn.Module):
    """Multi-scale Feature Interaction Network (three pyramid levels with cross-level fusion)."""

    def __init__(self, config: MSFINConfig | str = "msfin-x4"):
        super().__init__()
        if isinstance(config, str):
            config = get_config(config)
        self.config = config
        n, g, r, k = config.n_feats, config.groups, config.reduction, config.num_steps

        def block(channels: int) -> RRCAB:
            return RRCAB(channels, g, r, k)

        self.sub_mean = MeanShift(config.rgb_range, config.rgb_mean, sign=-1)
        self.add_mean = MeanShift(config.rgb_range, config.rgb_mean, sign=+1)
        self.head = conv3x3(3, n)

        # Level 3: quarter resolution at 4n channels, then half resolution at n channels.
        self.ds4_down = Down4(n)
        self.ds4_rcab = block(4 * n)
        self.ds4_rcab1 = block(4 * n)
        self.ds4_rcab1_2 = block(4 * n)
        self.ds4_rcab1_3 = block(4 * n)
        self.c1 = conv1x1(12 * n, 4 * n)
        self.ds4_rcab1_4 = block(4 * n)
        self.ds4_up4 = upsample2(4 * n, n)
        self.ds4_rcab2 = block(n)
        self.ds4_rcab3 = block(n)
        self.ds4_rcab3_2 = block(n)
        self.ds4_rcab3_3 = block(n)
        self.c2 = conv1x1(3 * n, n)
        self.ds4_rcab3_4 = block(n)
        self.ds4_up5 = upsample2(n, n)

        # Level 2: half resolution at 2n channels, fed by level 3.
        self.ds2_down = Down2(n)
        self.Fd21 = nn.ConvTranspose2d(4 * n, 2 * n, 2, stride=2)
        self.Fd22 = nn.ConvTranspose2d(4 * n, 2 * n, 2, stride=2)
        self.Fd23 = conv1x1(n, 2 * n)
        self.Fd24 = conv1x1(n, 2 * n)
        self.ds2_rcab = block(2 * n)
        self.ds2_rcab2 = block(2 * n)
        self.ds2_rcab3 = block(2 * n)
        self.ds2_rcab4 = block(2 * n)
        self.ds2_rcab5 = block(2 * n)
        self.ds2_up = Up2(n)

        # Level 1: full resolution at n channels, fed by level 2.
        self.Ft01 = nn.ConvTranspose2d(2 * n, n, 2, stride=2)
        self.Ft02 = nn.ConvTranspose2d(2 * n, n, 2, stride=2)
        self.Ft03 = nn.ConvTranspose2d(2 * n, n, 2, stride=2)
        self.Ft04 = nn.ConvTranspose2d(2 * n, n, 2, stride=2)
        self.ds0_body = block(n)
        self.ds0_body2 = block(n)
        self.ds0_body3 = block(n)
        self.ds0_body4 = block(n)
        self.ds0_body5 = block(n)

        # Reconstruction.
        self.block_re1 = block(n)
        self.block_re2 = block(n)
        self.block_re3 = block(n)
        self.block_re4 = block(n)
        self.tail2 = conv3x3(n, 3)

    @property
    def scale(self) -> int:
        return self.config.scale

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Mean-subtracted full-resolution image [N, 3, H, W] (H, W multiples of 4) → features before tail2."""
        F0 = self.head(y)

        d4 = self.ds4_down(F0)
        A1 = self.ds4_rcab(d4)
        A2 = self.ds4_rcab1(A1)
        A3 = self.ds4_rcab1_2(A2)
        A4 = self.ds4_rcab1_3(A3)
        A4b = self.ds4_rcab1_4(self.c1(torch.cat([d4, A2, A4], dim=1)))
        u1 = self.ds4_up4(A4b)
        A5 = self.ds4_rcab2(u1)
        A6 = self.ds4_rcab3(A5)
        A7 = self.ds4_rcab3_2(A6)
        A8 = self.ds4_rcab3_3(A7)
        A8b = self.ds4_rcab3_4(self.c2(torch.cat([u1, A6, A8], dim=1)))
        L3 = self.ds4_up5(A8b)

        d2 = self.ds2_down(F0)
        B1 = self.ds2_rcab(d2 + self.Fd21(A2))
        B2 = self.ds2_rcab2(B1 + self.Fd22(A4))
        B3 = self.ds2_rcab3(B2 + self.Fd23(A6))
        B4 = self.ds2_rcab4(B3 + self.Fd24(A8))
        B5 = self.ds2_rcab5(B4)
        L2 = self.ds2_up(B5)

        C1 = self.ds0_body(F0 + self.Ft01(B1))
        C2 = self.ds0_body2(C1 + self.Ft02(B2))
        C3 = self.ds0_body3(C2 + self.Ft03(B3))
        C4 = self.ds0_body4(C3 + self.Ft04(B4))
        C5 = self.ds0_body5(C4)

        D = C5 + L2 + L3
        for block in (self.block_re1, self.block_re2, self.block_re3, self.block_re4):
            D = block(D)
        return D

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """LR image [N, 3, h, w] in [0, rgb_range] → SR image [N, 3, scale·h, scale·w], unclamped.

        The input's NaN/Inf test costs a host sync: ``check_finite=False`` skips it (callers that
        validated the input, or capture a CUDA graph). Under ``torch.compile`` it is left out, so
        it never breaks the graph; check the output there.
        """
        check_finite = check_finite and not torch.compiler.is_compiling()
        check_input(x, self.head.weight.dtype, check_finite=check_finite)
        y = self.upsample(x)
        H, W = y.shape[-2:]
        out = self.add_mean(self.tail2(self.features(self.sub_mean(pyramid_pad(y)))))
        return out[..., :H, :W]

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """The network's first step: the LR image bilinearly ×scale (align_corners=False)."""
        s = self.config.scale
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s > 1 else x


def pyramid_pad(y: torch.Tensor) -> torch.Tensor:
    """``y`` replicate-padded at the bottom and right to a multiple of the down-sampling pyramid's
    stride (``PYRAMID_MULTIPLE``), as the network pads its upsampled input; the output is cropped back."""
    H, W = y.shape[-2:]
    pad_h, pad_w = -H % PYRAMID_MULTIPLE, -W % PYRAMID_MULTIPLE
    return F.pad(y, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else y


def msfin_x4() -> MSFIN:
    """MSFIN ×4, untrained (682,159 parameters)."""
    return MSFIN("msfin-x4")


def msfin_s_x4() -> MSFIN:
    """MSFIN-S ×4, untrained (351,851 parameters)."""
    return MSFIN("msfin-s-x4")
