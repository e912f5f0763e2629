"""The reference module: names, shapes, recurrence, batch independence, input errors."""

import pytest
import torch

from msfin_fast import MSFIN, InvalidInputError, MSFINConfig
from msfin_fast.model import RRCAB, check_input

torch.manual_seed(0)


@pytest.mark.parametrize("name, file", [("msfin-x4", "MSFIN_X4.pt"), ("msfin-s-x4", "MSFIN-S_X4.pt")])
def test_state_dict_names_and_shapes_equal_the_released_file(weights_dir, name, file):
    released = torch.load(weights_dir / file, map_location="cpu", weights_only=True)
    ours = MSFIN(name).state_dict()
    assert ours.keys() == released.keys()
    assert all(ours[k].shape == released[k].shape for k in ours)
    MSFIN(name).load_state_dict(released, strict=True)


def test_mean_shift_starts_as_identity_and_mean_and_loads_trained_values(weights_dir):
    model = MSFIN("msfin-x4")
    eye = torch.eye(3).view(3, 3, 1, 1)
    mean = 255 * torch.tensor([0.4488, 0.4371, 0.4040])
    assert torch.equal(model.sub_mean.weight, eye) and torch.equal(model.add_mean.weight, eye)
    torch.testing.assert_close(model.sub_mean.bias.detach(), -mean)
    torch.testing.assert_close(model.add_mean.bias.detach(), mean)
    # The released files carry trained (non-identity) mean shifts; they must be used as stored.
    released = torch.load(weights_dir / "MSFIN_X4.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(released["sub_mean.weight"], eye)
    model.load_state_dict(released)
    assert torch.equal(model.sub_mean.weight, released["sub_mean.weight"])


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 7, 5), (1, 3, 1, 1), (3, 3, 4, 9)])
def test_output_shape(preset, shape):
    model = MSFIN(preset).eval()
    with torch.no_grad():
        y = model(torch.rand(shape) * 255)
    n, c, h, w = shape
    assert y.shape == (n, 3, 4 * h, 4 * w)
    assert torch.isfinite(y).all()


def test_batch_items_are_independent(pretrained):
    model = pretrained("msfin-s-x4")
    x = torch.rand(3, 3, 9, 7) * 255
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    # Channel attention averages over each sample only; batching must not mix samples.
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-3)


def test_recurrence_applies_the_same_block_again():
    once = RRCAB(24, 6, 5, num_steps=0)
    twice = RRCAB(24, 6, 5, num_steps=1)
    twice.load_state_dict(once.state_dict())
    t = torch.randn(2, 24, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(twice(t), once(once(t)))


def test_rrcab_step_by_hand():
    block = RRCAB(8, 2, 4, num_steps=0)
    conv_a, _, conv_b, _, conv_1, ca = block.body
    t = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        u = conv_1(torch.relu(conv_b(torch.relu(conv_a(t)))))
        s = torch.sigmoid(ca.conv_du[2](torch.relu(ca.conv_du[0](u.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(block(t), t + u * s)


def test_untrained_models_at_other_scales_pad_to_the_pyramid_and_crop_back():
    for scale in (1, 2, 3):
        model = MSFIN(MSFINConfig(n_feats=8, groups=2, reduction=4, num_steps=0, scale=scale)).eval()
        with torch.no_grad():
            y = model(torch.full((1, 3, 5, 7), 100.0))
        assert y.shape == (1, 3, 5 * scale, 7 * scale)


def test_training_reaches_every_parameter():
    model = MSFIN(MSFINConfig(n_feats=8, groups=2, reduction=4, num_steps=1, scale=2))
    y = model(torch.rand(2, 3, 6, 6) * 255)
    y.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # (a squeeze unit may sit dead behind its ReLU at random init, so only spot-check magnitudes)
    for layer in (model.sub_mean, model.head, model.ds4_down.down2[2], model.tail2, model.add_mean):
        assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 8, 8), "4-D"),
        (torch.rand(1, 4, 8, 8), "3 RGB channels"),
        (torch.rand(1, 1, 8, 8), "3 RGB channels"),
        (torch.rand(1, 3, 0, 8), "zero-size"),
        (torch.rand(0, 3, 8, 8), "zero-size"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "floating-point"),
        (torch.rand(1, 3, 8, 8, dtype=torch.float64), "does not match the model's dtype"),
        (torch.tensor(float("nan")).expand(1, 3, 4, 4), "NaN or Inf"),
        (torch.full((1, 3, 4, 4), float("inf")), "NaN or Inf"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_a_typed_error(x, message):
    model = MSFIN("msfin-s-x4")
    with pytest.raises(InvalidInputError, match=message):
        model(x)


def test_check_input_is_a_value_error():
    with pytest.raises(ValueError):
        check_input(torch.rand(1, 2, 3, 3))


def test_infer_config_reads_the_shapes_of_both_released_files_and_of_other_widths(weights_dir):
    from msfin_fast import WeightsError
    from msfin_fast.config import PRESETS
    from msfin_fast.weights import REGISTRY, infer_config, read_state_dict

    for preset, entry in REGISTRY.items():
        assert infer_config(read_state_dict(weights_dir / entry.filename)) == PRESETS[preset]
    other = MSFINConfig(n_feats=20, groups=5, reduction=3, num_steps=2)
    with pytest.warns(UserWarning, match="num_steps=1"):  # the recurrence is not in the tensors
        assert infer_config(MSFIN(other).state_dict()) == other.replace(num_steps=1)
    state = MSFIN("msfin-s-x4").state_dict()
    state.pop("Fd21.weight")
    with pytest.raises(WeightsError, match="missing keys .*Fd21.weight"):
        infer_config(state)
