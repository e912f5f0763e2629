"""Training on a few tiny generated images: the recipe's pieces, learning, exact resume, checkpoints.

Everything runs MSFIN-S at ×2 on 64×64 HR images with 8×8 LR patches. On feature maps this
small, a second intra-op thread costs more than it gives (and on a busy machine it makes the
steps ten times slower), so the module runs torch on one thread; the whole file takes about 10 s.
"""

import csv
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from msfin_fast import MSFIN, load_pretrained
from msfin_fast.cli import main
from msfin_fast.config import get_config
from msfin_fast.errors import ConfigError, DatasetError, DeviceError, TrainingError, WeightsError
from msfin_fast.evaluate import hr_lr_pair
from msfin_fast.images import read_image
from msfin_fast.sample import sample_hr
from msfin_fast.train import (
    MODEL_FILE,
    STATE_FILE,
    PatchDataset,
    StepBatches,
    TrainConfig,
    Trainer,
    cosine_lr,
    prepare_pairs,
    random_patch,
    train,
)
from msfin_fast.weights import REGISTRY, read_state_dict


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    """Four 64×64 HR images: differently rotated crops of the synthetic test scene."""
    folder = tmp_path_factory.mktemp("hr")
    scene = sample_hr(128)
    for i in range(4):
        crop = np.rot90(scene, i)[16 * i:16 * i + 64, 32:96]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"img{i}.png")
    return folder


def tiny(hr_dir, out, **changes):
    values = dict(data=hr_dir, out=out, steps=8, model="msfin-s-x4", scale=2, patch=8, batch_size=2,
                  num_workers=0, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# The recipe's pieces


def test_defaults_are_the_papers_recipe(tmp_path):
    cfg = TrainConfig(data=tmp_path, out=tmp_path, steps=10)
    assert (cfg.patch, cfg.hr_patch, cfg.batch_size) == (48, 192, 16)
    assert (cfg.lr, cfg.lr_min, cfg.betas, cfg.eps) == (1e-4, 6.25e-6, (0.9, 0.999), 1e-8)
    assert cosine_lr(0, 1000, 1e-4, 6.25e-6) == pytest.approx(1e-4, rel=1e-12)
    assert cosine_lr(500, 1000, 1e-4, 6.25e-6) == pytest.approx((1e-4 + 6.25e-6) / 2, rel=1e-12)
    assert cosine_lr(1000, 1000, 1e-4, 6.25e-6) == pytest.approx(6.25e-6, rel=1e-12)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr=1e-4, lr_min=1e-3), "lr_min <= lr"),
        (dict(model="edsr"), "unknown model preset"),
        (dict(from_pretrained=True, init_weights="w.pt"), "give one"),
        (dict(precision="fp8"), "unknown precision"),
        (dict(num_workers=-1), "num_workers"),
    ],
)
def test_bad_config_is_refused(tmp_path, changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**{"data": tmp_path, "out": tmp_path, "steps": 10, **changes})


def test_patches_stay_aligned_under_all_eight_orientations():
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, 3, axis=0), 3, axis=1)  # every LR pixel is a 3×3 HR block
    orientations = set()
    for _ in range(150):
        lr_p, hr_p = random_patch(lr, hr, 3, 4, rng)
        assert lr_p.shape == (4, 4, 3) and hr_p.shape == (12, 12, 3)
        np.testing.assert_array_equal(hr_p, np.repeat(np.repeat(lr_p, 3, axis=0), 3, axis=1))
        # Which of the 8 flips/rotations of which 4×4 crop of lr is this patch?
        found = {
            (k, flip)
            for y in range(9) for x in range(7) for k in range(4) for flip in (False, True)
            if np.array_equal(np.rot90(lr[y:y + 4, x:x + 4][:, ::-1] if flip else lr[y:y + 4, x:x + 4], k), lr_p)
        }
        assert found, "the LR patch is not a crop of the LR image"
        orientations |= found
    assert len(orientations) == 8


def test_patch_stream_depends_on_seed_step_and_slot_only(hr_dir, tmp_path):
    with Trainer(tiny(hr_dir, tmp_path)) as trainer:
        data = trainer.dataset
        lr, hr = data[(5, 1)]
        assert lr.dtype == torch.uint8 and lr.shape == (3, 8, 8) and hr.shape == (3, 16, 16)
        again = PatchDataset(trainer.train_pairs, 2, 8, seed=3)[(5, 1)]
        assert torch.equal(again[0], lr) and torch.equal(again[1], hr)
        others = [data[(6, 1)][0], data[(5, 0)][0], PatchDataset(trainer.train_pairs, 2, 8, seed=4)[(5, 1)][0]]
        assert not any(torch.equal(other, lr) for other in others)
        assert list(StepBatches(3, 5, 2)) == [[(3, 0), (3, 1)], [(4, 0), (4, 1)]]


def test_cache_holds_the_eval_pair_and_is_reused(hr_dir, tmp_path, monkeypatch):
    import msfin_fast.train.data as train_data

    pairs = prepare_pairs(hr_dir, 3, tmp_path / "cache", min_hr=24)
    assert len(pairs) == 4
    for pair in pairs:
        hr, lr = hr_lr_pair(read_image(pair.source).rgb, 3)  # 64 → 63 at ×3, LR 21×21
        np.testing.assert_array_equal(np.load(pair.hr), hr)
        np.testing.assert_array_equal(np.load(pair.lr), lr)
        assert pair.hr_size == (63, 63)

    def no_resize(*args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(train_data, "hr_lr_pair", no_resize)
    assert prepare_pairs(hr_dir, 3, tmp_path / "cache", min_hr=24) == pairs  # all from the cache

    # A changed source file is a new cache entry.
    changed = tmp_path / "changed"
    changed.mkdir()
    Image.open(pairs[0].source).rotate(90).save(changed / "img0.png")
    with pytest.raises(AssertionError, match="cache was not used"):
        prepare_pairs(changed, 3, tmp_path / "cache", min_hr=24)


def _bad_folder(tmp_path, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    good = sample_hr(64)
    Image.fromarray(good).save(folder / "good.png")
    if kind == "too-small":
        Image.fromarray(good[:40, :33]).save(folder / "small.png")  # 33 → 32 at ×2, 40 ≥ 32: fine
        Image.fromarray(good[:31, :40]).save(folder / "tiny.png")   # 31 → 30 < 32
        return folder, ["tiny.png", "40×31 pixels (40×30 after cropping", "smaller than the 32×32"], ["small.png"]
    if kind == "not-an-image":
        (folder / "notes.jpg").write_bytes(b"this is text, not a JPEG")
        return folder, ["notes.jpg", "not an image file"], []
    if kind == "truncated":
        data = (folder / "good.png").read_bytes()
        (folder / "cut.png").write_bytes(data[: len(data) // 2])
        return folder, ["cut.png", "cannot read image"], []
    if kind == "empty":
        (folder / "good.png").unlink()
        (folder / "readme.txt").write_text("no images here")
        return folder, ["no images"], []
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["too-small", "not-an-image", "truncated", "empty"])
def test_unusable_images_are_refused_up_front_by_name(tmp_path, kind):
    folder, fragments, not_named = _bad_folder(tmp_path, kind)
    with pytest.raises(DatasetError) as info:
        Trainer(TrainConfig(data=folder, out=tmp_path / "run", steps=5, model="msfin-s-x4", scale=2,
                            patch=16, num_workers=0))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    for name in not_named:
        assert name not in message, message
    assert not (tmp_path / "run" / STATE_FILE).exists()


def test_mixed_precision_needs_cuda(hr_dir, tmp_path):
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        Trainer(tiny(hr_dir, tmp_path, device="cpu", precision="bf16"))


# ---------------------------------------------------------------------------------------------
# Learning and resuming


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_benchmark_is_on_while_the_trainer_is_open_only(hr_dir, tmp_path, before, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", before)
    with Trainer(tiny(hr_dir, tmp_path, steps=1)) as trainer:
        assert torch.backends.cudnn.benchmark is True
        trainer.step()
    assert torch.backends.cudnn.benchmark is before
    trainer.close()  # a second close changes nothing
    assert torch.backends.cudnn.benchmark is before


def test_loss_goes_down(hr_dir, tmp_path):
    cfg = tiny(hr_dir, tmp_path, steps=30, batch_size=4, lr=2e-3, lr_min=2e-4)
    with Trainer(cfg) as trainer:
        # A fixed held-out batch (indices past the run's steps), scored before and after.
        held = [trainer.dataset[(10_000, i)] for i in range(8)]
        lr_batch = torch.stack([lr for lr, _ in held]).float()
        hr_batch = torch.stack([hr for _, hr in held]).float()

        def held_loss():
            with torch.no_grad():
                return float(F.l1_loss(trainer.model(lr_batch), hr_batch))

        before = held_loss()
        lrs, losses = [], []
        for _ in range(cfg.steps):
            lrs.append(trainer.lr)
            losses.append(float(trainer.step()))
        after = held_loss()
    assert all(math.isfinite(v) for v in losses)
    # Single batches are noisy (each is 4 random 8×8 patches); the held batch is not.
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses
    assert after < 0.7 * before, (before, after)
    # The learning rate followed the cosine from lr to lr_min.
    np.testing.assert_allclose(lrs, [cosine_lr(t, 30, 2e-3, 2e-4) for t in range(30)], rtol=1e-9)
    assert trainer.lr == pytest.approx(2e-4, rel=1e-9)


def test_resume_continues_exactly(hr_dir, tmp_path):
    """8 steps in one go == 4 steps, save, a new Trainer from the files, 4 more steps (with workers)."""
    with Trainer(tiny(hr_dir, tmp_path / "a")) as a:
        straight = [float(a.step()) for _ in range(8)]
        final = a.weights()
        adam = a.optimizer.state_dict()

    with Trainer(tiny(hr_dir, tmp_path / "b")) as b:
        first = [float(b.step()) for _ in range(4)]
        b.save()
        rng_at_save = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        torch.manual_seed(1234)  # disturb the global RNGs: resume must restore them
        np.random.seed(1234)
        random.seed(1234)
    # Data loading in worker processes gives the same stream as loading in-process.
    with Trainer.resume(tmp_path / "b", num_workers=2) as resumed:
        assert resumed.step_count == 4
        assert torch.equal(torch.get_rng_state(), rng_at_save[0])
        np.testing.assert_array_equal(np.random.get_state()[1], rng_at_save[1])
        assert random.getstate() == rng_at_save[2]
        second = [float(resumed.step()) for _ in range(4)]
        resumed_weights = resumed.weights()
        resumed_adam = resumed.optimizer.state_dict()

    assert first + second == straight
    assert final.keys() == resumed_weights.keys()
    assert all(torch.equal(final[k], resumed_weights[k]) for k in final)
    for i, s in adam["state"].items():
        for name, value in s.items():
            assert torch.equal(value, resumed_adam["state"][i][name]), name
    assert resumed_adam["param_groups"][0]["lr"] == adam["param_groups"][0]["lr"]


def test_ctrl_c_checkpoints_and_the_resumed_run_matches(hr_dir, tmp_path, monkeypatch):
    """run() to the end vs run() stopped by SIGINT after step 3 and resumed: same log, same weights."""
    settings = dict(steps=6, log_every=2, save_every=4, val_data=hr_dir, val_every=4)
    summary = train(tiny(hr_dir, tmp_path / "a", **settings))
    assert (summary.step, summary.interrupted) == (6, False)

    real_step = Trainer.step

    def step_then_ctrl_c(self):
        loss = real_step(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    stopped = train(tiny(hr_dir, tmp_path / "b", **settings))
    assert (stopped.step, stopped.interrupted) == (3, True)
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed = train(tiny(hr_dir, tmp_path / "b", **settings), resume=True)
    assert (resumed.step, resumed.interrupted) == (6, False)

    log_a, log_b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    assert [r["step"] for r in log_a] == ["2", "4", "6"]
    assert log_a == log_b  # loss (a window split by the interruption), lr and val_psnr alike
    assert log_a[1]["val_psnr"] and log_a[2]["val_psnr"] and not log_a[0]["val_psnr"]
    a, b = torch.load(tmp_path / "a" / MODEL_FILE), torch.load(tmp_path / "b" / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_psnr == summary.best_psnr

    # A crash after the last row was logged but before its checkpoint: the resumed run drops the
    # rows past the checkpoint and writes them again.
    real_save = Trainer.save

    def crash_at_the_end(self):
        if self.step_count == 6:
            raise RuntimeError("power cut")
        return real_save(self)

    monkeypatch.setattr(Trainer, "save", crash_at_the_end)
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny(hr_dir, tmp_path / "c", **settings))
    assert [r["step"] for r in read_log(tmp_path / "c" / "log.csv")] == ["2", "4", "6"]
    monkeypatch.setattr(Trainer, "save", real_save)
    train(tiny(hr_dir, tmp_path / "c", **settings), resume=True)
    assert read_log(tmp_path / "c" / "log.csv") == log_a


def test_resume_refuses_to_change_the_math(hr_dir, tmp_path):
    with Trainer(tiny(hr_dir, tmp_path)) as t:
        t.step()
        t.save()
    with pytest.raises(TrainingError, match="batch_size was 2 .* cannot change"):
        Trainer.resume(tmp_path, batch_size=4)
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(tiny(hr_dir, tmp_path))
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot be loaded"):
        Trainer.resume(tmp_path)


# ---------------------------------------------------------------------------------------------
# Checkpoints and starting weights


def test_checkpoint_loads_strictly_into_the_reference_and_eval(hr_dir, tmp_path, weights_dir, capsys):
    cfg = tiny(hr_dir, tmp_path / "run", scale=4, patch=4, steps=2)  # the preset's own scale
    with Trainer(cfg) as trainer:
        trainer.step()
        trainer.step()
        path = trainer.save()
        trainer.model.eval()
        x = torch.rand(1, 3, 12, 16) * 255
        with torch.no_grad():
            expected = trainer.model(x)

    state = torch.load(path, weights_only=True)
    released = read_state_dict(weights_dir / REGISTRY["msfin-s-x4"].filename)
    assert set(state) == set(released)  # the released key format, nothing else
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())
    reference = MSFIN("msfin-s-x4")
    reference.load_state_dict(state, strict=True)
    loaded = load_pretrained("msfin-s-x4", weights=path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert not torch.equal(state["head.weight"], MSFIN("msfin-s-x4").state_dict()["head.weight"])

    assert main(["eval", "--model", "msfin-s-x4", "--weights", str(path), "--data", str(hr_dir)]) == 0
    assert "msfin-s-x4" in capsys.readouterr().out


@pytest.mark.parametrize("scale", [2, 3])
def test_from_pretrained_loads_every_released_weight_at_any_scale(hr_dir, tmp_path, weights_dir, scale):
    cfg = tiny(hr_dir, tmp_path, scale=scale, from_pretrained=True)
    with Trainer(cfg) as trainer:
        assert trainer.model.scale == scale
        released = read_state_dict(weights_dir / REGISTRY["msfin-s-x4"].filename)
        weights = trainer.weights()
        assert weights.keys() == released.keys()
        assert all(torch.equal(weights[k], released[k]) for k in released)
    init = tmp_path / "own.pt"
    torch.save(released, init)
    with Trainer(tiny(hr_dir, tmp_path / "own", scale=scale, init_weights=init)) as own:
        assert torch.equal(own.weights()["tail2.weight"], released["tail2.weight"])
    with pytest.raises(WeightsError, match="does not fit preset 'msfin-x4'"):
        Trainer(tiny(hr_dir, tmp_path / "wrong", model="msfin-x4", init_weights=init))


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_trains_validates_logs_and_resumes(hr_dir, tmp_path, capsys, one_line_error):
    out = tmp_path / "run"
    args = ["train", "--data", str(hr_dir), "--out", str(out), "--model", "msfin-s-x4", "--scale", "2",
            "--patch", "8", "--batch", "2", "--steps", "4", "--val", str(hr_dir), "--val-every", "2",
            "--log-every", "1", "--workers", "0", "-q"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "trained msfin-s-x4 ×2 to step 4/4 on cpu (fp32)" in summary and "val PSNR" in summary
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [bool(r["val_psnr"]) for r in rows] == [False, True, False, True]
    assert float(rows[0]["lr"]) == pytest.approx(1e-4)
    assert all(float(r["loss"]) > 0 for r in rows)
    for name in ("model.pt", "model_best.pt", "train_state.pt"):
        assert (out / name).is_file()
    model = MSFIN(get_config("msfin-s-x4").replace(scale=2))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)

    assert main(args) == 1
    one_line_error("already holds a training run")
    assert main(["train", "--out", str(out), "--resume", "-q"]) == 1
    one_line_error("already finished (4/4 steps)")
    assert main(["train", "--out", str(out), "--resume", "--lr", "1e-3"]) == 1
    one_line_error("lr was 0.0001", "cannot change")
    assert main(["train", "--out", str(tmp_path / "new"), "--steps", "3"]) == 1
    one_line_error("--data needed")
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none"), "--steps", "3"]) == 1
    one_line_error("none: not a folder")
    (tmp_path / "file").write_text("")
    assert main(["train", "--out", str(tmp_path / "file"), "--data", str(hr_dir), "--steps", "3"]) == 1
    one_line_error("file: cannot create the output folder")


def test_cli_names_the_bad_image(tmp_path, capsys, one_line_error):
    folder, fragments, _ = _bad_folder(tmp_path, "not-an-image")
    rc = main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "3",
               "--patch", "8", "--workers", "0", "-q"])
    assert rc == 1
    one_line_error(*fragments)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(hr_dir, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = tiny(hr_dir, tmp_path, device="cuda", precision=precision, steps=20, batch_size=8,
               lr=5e-4, num_workers=2, val_data=hr_dir)
    benchmark = torch.backends.cudnn.benchmark
    with Trainer(cfg) as trainer:
        losses = [float(trainer.step()) for _ in range(cfg.steps)]
        assert trainer.scaler.is_enabled() == (precision == "fp16")
        assert math.isfinite(trainer.validate())
        path = trainer.save()
    assert torch.backends.cudnn.benchmark == benchmark
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())


def test_sigterm_checkpoints_like_ctrl_c(hr_dir, tmp_path, monkeypatch):
    """A scheduler's SIGTERM stops after the step in progress with a checkpoint, and says which
    signal it was (the CLI exits 143)."""
    real_step = Trainer.step

    def step_then_sigterm(self):
        loss = real_step(self)
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(tiny(hr_dir, tmp_path / "run", steps=5, log_every=1, save_every=10))
    summary = trainer.run()
    assert trainer.stop_signal == signal.SIGTERM
    assert (summary.step, summary.interrupted) == (2, True)
    assert (tmp_path / "run" / MODEL_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
