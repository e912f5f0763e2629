"""Weights by name: lookup order, checksums, download, and clear errors for bad files."""

import shutil

import pytest
import torch

import msfin_fast.weights as W
from msfin_fast import ConfigError, WeightsError, load_pretrained


@pytest.mark.parametrize("name, count", [("msfin-x4", 682_159), ("msfin-s-x4", 351_851)])
def test_load_pretrained_by_name(weights_dir, name, count):
    model = load_pretrained(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == count
    released = torch.load(weights_dir / W.REGISTRY[name].filename, map_location="cpu", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released.items())


def test_registry_checksums_are_those_of_the_released_files(weights_dir):
    for entry in W.REGISTRY.values():
        assert W.sha256_of(weights_dir / entry.filename) == entry.sha256
        assert entry.url.endswith(f"/test/model/{entry.filename}")
        assert W.UPSTREAM_COMMIT in entry.url


def test_dtype_and_device(weights_dir):
    model = load_pretrained("msfin-s-x4", device="cpu", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_pretrained("edsr")


def test_hub_cache_is_used_when_no_env_dir(weights_dir, monkeypatch):
    monkeypatch.delenv("MSFIN_WEIGHTS_DIR")
    with pytest.raises(WeightsError, match="MSFIN_OFFLINE"):
        load_pretrained("msfin-s-x4")
    hub = W.hub_checkpoint_dir()
    hub.mkdir(parents=True)
    shutil.copy(weights_dir / "MSFIN-S_X4.pt", hub)
    assert W.locate("msfin-s-x4") == hub / "MSFIN-S_X4.pt"
    load_pretrained("msfin-s-x4")


def test_env_dir_wins_over_hub_cache(weights_dir, tmp_path, monkeypatch):
    hub = W.hub_checkpoint_dir()
    hub.mkdir(parents=True)
    (hub / "MSFIN_X4.pt").write_bytes(b"stale")
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(weights_dir))
    assert W.locate("msfin-x4") == weights_dir / "MSFIN_X4.pt"


def test_corrupt_file_found_by_name_fails_the_checksum(weights_dir, tmp_path, monkeypatch):
    data = bytearray((weights_dir / "MSFIN_X4.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "MSFIN_X4.pt").write_bytes(bytes(data))
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"not the released msfin-x4 checkpoint: SHA-256"):
        load_pretrained("msfin-x4")


def test_wrong_preset_file_under_the_right_name_fails_the_checksum(weights_dir, tmp_path, monkeypatch):
    shutil.copy(weights_dir / "MSFIN-S_X4.pt", tmp_path / "MSFIN_X4.pt")
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="msfin-x4"):
        load_pretrained("msfin-x4")


def test_wrong_preset_file_given_explicitly_names_preset_and_keys(weights_dir):
    with pytest.raises(WeightsError) as info:
        load_pretrained("msfin-x4", weights=weights_dir / "MSFIN-S_X4.pt")
    message = str(info.value)
    assert "'msfin-x4'" in message and "shape mismatches" in message
    assert "head.weight" in message or "Fd21" in message
    assert "looks like a msfin-s-x4 checkpoint" in message


def test_truncated_file(weights_dir, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes((weights_dir / "MSFIN_X4.pt").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="cannot be loaded as a PyTorch checkpoint"):
        load_pretrained("msfin-x4", weights=path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint"):
        load_pretrained("msfin-x4", weights=path)


def test_foreign_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match=r"283 missing keys .*1 unexpected keys \(encoder.weight\)"):
        load_pretrained("msfin-x4", weights=path)


def test_checkpoint_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "opt": object()}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        load_pretrained("msfin-x4", weights=path)


def test_non_mapping_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        load_pretrained("msfin-x4", weights=path)


def test_wrapped_and_dataparallel_checkpoints_load(weights_dir, tmp_path):
    state = torch.load(weights_dir / "MSFIN-S_X4.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "finetuned.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = load_pretrained("msfin-s-x4", weights=path)
    assert torch.equal(model.head.weight, state["head.weight"])


def test_missing_explicit_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained("msfin-x4", weights=tmp_path / "nope.pt")


def test_not_found_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"msfin-x4: weights not found \(looked in"):
        load_pretrained("msfin-x4", allow_download=False)


@pytest.fixture
def mirror(weights_dir, tmp_path, monkeypatch):
    """Serve the upstream folder from a local file:// URL; downloads are allowed again."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(W, "UPSTREAM_BASE", site.as_uri())
    monkeypatch.delenv("MSFIN_OFFLINE")
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path / "empty"))
    return site


def test_download_verifies_and_caches(weights_dir, mirror):
    shutil.copy(weights_dir / "MSFIN-S_X4.pt", mirror)
    model = load_pretrained("msfin-s-x4")
    cached = W.hub_checkpoint_dir() / "MSFIN-S_X4.pt"
    assert cached.is_file() and W.sha256_of(cached) == W.REGISTRY["msfin-s-x4"].sha256
    assert sum(p.numel() for p in model.parameters()) == 351_851
    (mirror / "MSFIN-S_X4.pt").unlink()  # the second load must come from the cache
    load_pretrained("msfin-s-x4")


def test_download_with_wrong_checksum_saves_nothing(weights_dir, mirror):
    shutil.copy(weights_dir / "MSFIN-S_X4.pt", mirror / "MSFIN_X4.pt")
    with pytest.raises(WeightsError, match="SHA-256 .* nothing was saved"):
        load_pretrained("msfin-x4")
    hub = W.hub_checkpoint_dir()
    assert not hub.exists() or list(hub.iterdir()) == []


def test_download_failure_is_a_clear_error(mirror):
    with pytest.raises(WeightsError, match="download from .* failed .*MSFIN_WEIGHTS_DIR"):
        load_pretrained("msfin-x4")


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), r"'ds0_body3.body.2.weight' holds \d+ NaN value"),
    (lambda t: t.index_fill_(0, torch.tensor([1]), float("-inf")), r"'ds0_body3.body.2.weight' holds \d+ Inf value"),
    (lambda t: t.round().to(torch.int64), r"'ds0_body3.body.2.weight' has dtype torch.int64; weights must be floating"),
])
def test_non_finite_or_integer_tensors_are_refused_by_name(weights_dir, tmp_path, damage, message):
    """Such files load without a complaint from torch and make every image black (NaN → 0)."""
    state = torch.load(weights_dir / "MSFIN-S_X4.pt", map_location="cpu", weights_only=True)
    state["ds0_body3.body.2.weight"] = damage(state["ds0_body3.body.2.weight"].clone())
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=message):
        load_pretrained("msfin-s-x4", weights=path)


def test_upscaler_refuses_a_module_with_non_finite_parameters():
    from msfin_fast import Upscaler
    from msfin_fast.model import MSFIN

    model = MSFIN("msfin-s-x4")
    with torch.no_grad():
        model.tail2.bias[1] = float("nan")
    with pytest.raises(WeightsError, match=r"the given MSFIN: tensor 'tail2.bias' holds 1 NaN"):
        Upscaler(model, device="cpu")
