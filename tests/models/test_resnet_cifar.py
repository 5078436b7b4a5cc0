import pytest
import torch
from torch import nn

from sq_lightning.models import MLP, CifarResNet, resnet20, resnet32, resnet44, resnet56
from sq_lightning.models.resnet_cifar import _PadShortcut


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "expected"),
    # Option A (zero-padding shortcuts) counts, e.g. ResNet-20 "0.27M" in He et al. Table 6.
    [(resnet20, 269_722), (resnet32, 464_154), (resnet44, 658_586), (resnet56, 853_018)],
)
def test_param_counts_option_a(factory, expected):
    assert _n_params(factory()) == expected


def test_param_count_option_b_adds_two_projections():
    # Two 1x1 projections (16->32, 32->64) with batch norm: 512 + 64 + 2048 + 128 = 2752.
    assert _n_params(resnet20(shortcut="B")) == 272_474
    assert _n_params(resnet20(shortcut="B")) - _n_params(resnet20()) == 2752


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_weighted_layer_count_is_depth(depth):
    model = CifarResNet(depth)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == depth


@pytest.mark.parametrize("factory", [resnet20, resnet56])
def test_forward_shape(factory):
    model = factory(num_classes=7, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_stage_resolutions():
    model = resnet20()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[1:]))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}


def test_option_a_shortcut_is_subsampled_identity_with_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = _PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("depth", [0, 8 + 1, 21, "20"])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 2"):
        CifarResNet(depth)


def test_bad_shortcut_raises():
    with pytest.raises(ValueError, match="`shortcut` must be 'A' or 'B', got 'C'"):
        CifarResNet(20, shortcut="C")


def test_mlp_layers_and_flatten():
    model = MLP(64, [128, 64], 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 64), (64, 10)]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), model(x.flatten(1)))


def test_mlp_without_hidden_is_linear():
    model = MLP(4, [], 2)
    linear = model.net[1]
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), x @ linear.weight.T + linear.bias)


def test_mlp_bad_args_raise():
    with pytest.raises(ValueError, match=r"`hidden` must be a list of widths, got the int 32. Write `\[32\]`"):
        MLP(64, 32, 10)
    with pytest.raises(ValueError, match=r"`hidden` widths must all be >= 1, got \[0\]"):
        MLP(64, [0], 10)
    with pytest.raises(ValueError, match="`in_features` must be >= 1, got 0"):
        MLP(0, [4], 10)
