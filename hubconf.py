"""torch.hub entry points: the reference MSFIN and MSFIN-S ×4, with the released weights.

    model = torch.hub.load("path/to/msfin_fast", "msfin_x4", source="local")   # a checkout
    sr = model(lr)                       # float [N, 3, h, w] in 0–255 → [N, 3, 4h, 4w], unclamped

``pretrained=True`` (default) loads the authors' released file: from ``$MSFIN_WEIGHTS_DIR``, else the
torch hub cache (``<hub dir>/checkpoints``), else it is downloaded there, checked by SHA-256.
``upscaler`` returns a :class:`msfin_fast.Upscaler` (images, files, tiles, devices, backends).
"""

dependencies = ["torch", "numpy", "PIL"]


def _model(preset, pretrained, **kwargs):
    from msfin_fast import MSFIN, load_pretrained

    if not pretrained:
        if kwargs:
            raise TypeError(f"pretrained=False takes no other options, got {sorted(kwargs)}")
        return MSFIN(preset).eval()
    return load_pretrained(preset, **kwargs)


def msfin_x4(pretrained=True, **kwargs):
    """MSFIN ×4 (682,159 parameters): n_feats 24, 6 groups, each RRCAB applied twice.
    ``kwargs`` go to ``msfin_fast.load_pretrained`` (device, dtype, weights, progress)."""
    return _model("msfin-x4", pretrained, **kwargs)


def msfin_s_x4(pretrained=True, **kwargs):
    """MSFIN-S ×4 (351,851 parameters): n_feats 16, 4 groups, no recurrence.
    ``kwargs`` go to ``msfin_fast.load_pretrained`` (device, dtype, weights, progress)."""
    return _model("msfin-s-x4", pretrained, **kwargs)


def upscaler(model="msfin-x4", **kwargs):
    """A ready ``msfin_fast.Upscaler`` (``upscale`` takes PIL images, uint8 arrays or tensors);
    ``kwargs`` as the Upscaler's: device, dtype, backend, tile, self_ensemble, weights."""
    from msfin_fast import Upscaler

    return Upscaler(model, **kwargs)
