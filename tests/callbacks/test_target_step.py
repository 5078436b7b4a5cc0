"""`target_step`: per-layer strengths set from the dimensionless coupling step S_l."""

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sq_lightning.callbacks import SoftQuantCallback
from sq_lightning.coupler import WeightCoupler
from sq_lightning.ops.coupling import coupling_exact
from tests.helpers import TinyNet, digits_loaders, trainer


def _step_size(theta, w_l, h_l, lr_eff):
    """S_l computed independently: exact coupling gradient at h_l, RMS, in units of w_l."""
    g = coupling_exact(theta, w_l, h_l).grad.double()
    return lr_eff * float(g.pow(2).mean().sqrt()) / w_l


def test_calibrate_sets_every_layer_to_the_target_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40), torch.nn.Linear(40, 10))
    cpl = WeightCoupler(w=0.3, target_step=0.1, backend="exact")
    h = cpl.calibrate(net, lr_eff=0.5)
    params = dict(net.named_parameters())
    assert set(h) == {"0.weight", "2.weight", "3.weight"}
    for name, h_l in h.items():
        s = _step_size(params[name].detach(), cpl.w_l(name), h_l, 0.5)
        assert s == pytest.approx(0.1, rel=1e-6)
    # Size scaling emerges from the calibration: bigger layers get smaller h_l.
    assert h["0.weight"] < h["2.weight"] < h["3.weight"]
    # Once calibrated, later calls keep the values.
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    assert cpl.calibrate(net, lr_eff=0.5) == h


def test_callback_calibrates_on_the_first_step_from_the_sgd_step_size():
    torch.manual_seed(0)
    model = TinyNet(lr=0.05, momentum=0.9)
    start = copy.deepcopy(model)
    train, _ = digits_loaders()
    cb = SoftQuantCallback(w=0.3, target_step=0.05)
    trainer(max_epochs=1, limit_train_batches=3, callbacks=[cb]).fit(model, train)
    # Calibrated on the weights of the first step = the initial weights.
    params = dict(start.named_parameters())
    assert set(cb.coupler.h_calibrated) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    lr_eff = 0.05 / (1 - 0.9)
    for name, h_l in cb.coupler.h_calibrated.items():
        theta = params[name].detach()
        w_l = 0.3 * float(theta.std())
        assert cb.coupler.w_l(name) == pytest.approx(w_l, rel=1e-6)
        assert _step_size(theta, w_l, h_l, lr_eff) == pytest.approx(0.05, rel=0.02)  # histogram vs exact


def test_calibration_is_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    train, _ = digits_loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = SoftQuantCallback(w=0.3, target_step=0.05)
    trainer(max_epochs=1, limit_train_batches=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(model, train)
    saved = dict(cb.coupler.h_calibrated)
    cb2 = SoftQuantCallback(w=0.3, target_step=0.05)
    trainer(max_epochs=2, limit_train_batches=2, callbacks=[cb2, ModelCheckpoint(dirpath=tmp_path / "b")],
            enable_checkpointing=True).fit(TinyNet(), train, ckpt_path=str(tmp_path / "last.ckpt"))
    # Resumed weights differ from the first run's start: a recalibration would change h_l.
    assert cb2.coupler.h_calibrated == saved


def test_adaptive_optimizer_is_refused_with_the_fix():
    class AdamNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    train, _ = digits_loaders()
    with pytest.raises(ValueError, match=r"optimizer is Adam.*Set `h` \(and `alpha`\) instead of `target_step`"):
        trainer(max_epochs=1, limit_train_batches=1, callbacks=[SoftQuantCallback(target_step=0.1)]).fit(AdamNet(), train)


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_target_step_is_named(value):
    with pytest.raises(ValueError, match="`target_step` must be a finite number > 0 or None"):
        SoftQuantCallback(target_step=value)


def test_calibrate_needs_target_step_and_a_positive_lr():
    net = torch.nn.Linear(10, 10)
    with pytest.raises(ValueError, match="`calibrate` needs `target_step`"):
        WeightCoupler().calibrate(net, 0.1)
    with pytest.raises(ValueError, match="`lr_eff` must be a finite number > 0"):
        WeightCoupler(target_step=0.1).calibrate(net, math.nan)
