"""torch.hub: the checkout's hubconf.py, loaded as users load it (``source="local"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msfin_fast import MSFIN, Upscaler

REPO = Path(__file__).resolve().parents[1]


def hub(entry, *args, **kwargs):
    return torch.hub.load(str(REPO), entry, *args, source="local", trust_repo=True, **kwargs)


@pytest.mark.parametrize("entry,preset", [("msfin_x4", "msfin-x4"), ("msfin_s_x4", "msfin-s-x4")])
def test_pretrained_entry_is_the_released_reference(entry, preset, pretrained):
    model = hub(entry)  # the weights from MSFIN_WEIGHTS_DIR, checked by SHA-256
    assert isinstance(model, MSFIN) and not model.training
    reference = pretrained(preset)
    assert model.config == reference.config
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_untrained_entry_and_options():
    model = hub("msfin_s_x4", pretrained=False)
    assert isinstance(model, MSFIN) and sum(p.numel() for p in model.parameters()) == 351_851
    half = hub("msfin_s_x4", dtype=torch.float16)
    assert half.head.weight.dtype == torch.float16
    with pytest.raises(TypeError, match="pretrained=False"):
        hub("msfin_x4", pretrained=False, dtype=torch.float16)


def test_upscaler_entry_upscales_an_array():
    up = hub("upscaler", "msfin-s-x4", device="cpu")
    assert isinstance(up, Upscaler)
    out = up.upscale(np.full((5, 7, 3), 128, np.uint8))
    assert out.shape == (20, 28, 3) and out.dtype == np.uint8
