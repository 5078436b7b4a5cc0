import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sq_lightning.models import recalibrate_batchnorm


class _TwoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5, momentum=0.3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _batches(n: int, size: int = 8):
    g = torch.Generator().manual_seed(1)
    # Non-zero mean and non-unit scale so that stale default statistics would be far off.
    return [
        (3.0 * torch.randn(size, 3, 6, 6, generator=g) + 1.5, torch.zeros(size, dtype=torch.long)) for _ in range(n)
    ]


def _manual_bn_inputs(model: _TwoBN, batches):
    """Inputs of bn1 and bn2 per batch, computed with functional ops (train-mode batch norm)."""
    in1, in2 = [], []
    with torch.no_grad():
        for x, _ in batches:
            h = model.conv1(x)
            in1.append(h)
            h = F.relu(F.batch_norm(h, None, None, model.bn1.weight, model.bn1.bias, training=True))
            in2.append(model.conv2(h))
    return in1, in2


def _expected_stats(inputs):
    mean = torch.cat(inputs).mean((0, 2, 3))
    # momentum=None averages the per-batch unbiased variances with equal weights.
    var = torch.stack([t.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for t in inputs]).mean(0)
    return mean, var


def test_running_stats_equal_true_activation_statistics():
    torch.manual_seed(0)
    model = _TwoBN().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    batches = _batches(4)
    recalibrate_batchnorm(model, batches, num_batches=3)
    in1, in2 = _manual_bn_inputs(model, batches[:3])  # only the first 3 batches count
    for bn, inputs in ((model.bn1, in1), (model.bn2, in2)):
        mean, var = _expected_stats(inputs)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == 3
    # The true mean differs from what a 4th batch would give: num_batches is honoured.
    mean4, _ = _expected_stats(_manual_bn_inputs(model, batches)[0])
    assert not torch.allclose(model.bn1.running_mean, mean4, atol=1e-5)


def test_modes_momentum_and_parameters_restored():
    model = _TwoBN()
    model.eval()
    model.bn2.train()  # mixed modes must come back as they were
    params = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_batchnorm(model, _batches(2))
    assert not model.training and not model.bn1.training and model.bn2.training
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.3
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)


def test_plain_tensor_batches_accepted():
    model = _TwoBN()
    recalibrate_batchnorm(model, [x for x, _ in _batches(2)])
    mean, _ = _expected_stats(_manual_bn_inputs(model, _batches(2))[0])
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-5, atol=1e-5)


def test_empty_loader_raises_and_keeps_statistics():
    model = _TwoBN()
    model.bn1.running_mean.fill_(2.0)
    with pytest.raises(ValueError, match="`loader` yielded no batch"):
        recalibrate_batchnorm(model, [])
    assert torch.all(model.bn1.running_mean == 2.0)
    assert model.bn1.momentum == 0.1


def test_bad_num_batches_raises():
    with pytest.raises(ValueError, match="`num_batches` must be an int >= 1, got 0"):
        recalibrate_batchnorm(_TwoBN(), _batches(1), num_batches=0)


def test_non_tensor_batch_raises_and_keeps_statistics():
    model = _TwoBN()
    model.bn1.running_mean.fill_(2.0)
    with pytest.raises(TypeError, match="`loader` must yield tensors or \\(x, y\\) tuples"):
        recalibrate_batchnorm(model, [("a", "b")])
    assert torch.all(model.bn1.running_mean == 2.0)


def test_model_without_batchnorm_is_unchanged():
    model = nn.Linear(3, 2)
    assert recalibrate_batchnorm(model, [torch.randn(2, 3)]) is model
