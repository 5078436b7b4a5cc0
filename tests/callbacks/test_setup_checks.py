"""What can be known before training is checked in ``setup``: windows against ``max_epochs``,
the snap against the coupling, layer selections, list arguments given as strings, and how
BatchNorm is re-estimated in a module without ``forward``."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sq_lightning.config import SnapConfig
from sq_lightning import ClusterRefine, LearnedCodebook, SoftQuantCallback
from sq_lightning.layers import LayerSelector
from sq_lightning.models import CharGPT
from sq_lightning.models.batchnorm import recalibrate_batchnorm
from tests.helpers import TinyNet, digits_loaders, trainer


class _StepCounter(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def _fails_at_setup(callbacks, match, max_epochs=2):
    counter = _StepCounter()
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    train, val = digits_loaders()
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs=max_epochs, callbacks=[*callbacks, counter]).fit(model, train, val)
    assert counter.steps == 0  # refused before the first step
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_coupling_window_after_the_last_epoch_fails_at_setup():
    _fails_at_setup([SoftQuantCallback(start_epoch=3)],
                    r"SoftQuantCallback: `start_epoch`=3 but the Trainer stops after `max_epochs`=2 .*never run")


def test_snap_after_the_last_epoch_fails_at_setup():
    _fails_at_setup([SoftQuantCallback(stop_epoch=10), ClusterRefine(snap_epoch=10)],
                    r"`snap_epoch`=10 but the Trainer stops after `max_epochs`=2 .*no refinement")


@pytest.mark.parametrize("start", [2, 3])
def test_snap_before_the_coupling_starts_fails_at_setup(start):
    _fails_at_setup([SoftQuantCallback(start_epoch=start), ClusterRefine(snap_epoch=2)],
                    rf"`snap_epoch`=2 is not after the start of the SoftQuantCallback .*`start_epoch`={start}",
                    max_epochs=4)


def test_regularizer_window_after_the_last_epoch_fails_at_setup():
    _fails_at_setup([LearnedCodebook(start_epoch=5)], r"LearnedCodebook: `start_epoch`=5 .*never run")


@pytest.mark.parametrize("cls", [SoftQuantCallback, ClusterRefine, LearnedCodebook])
def test_a_pattern_matching_nothing_fails_at_setup_naming_the_closest_layers(cls):
    _fails_at_setup([cls(include=["^net\\.9\\."])],
                    r"`include` pattern '\^net\\\\.9\\\\.' matches no weight of TinyNet.*Closest names: \['net\.")


@pytest.mark.parametrize("arg", ["include", "exclude", "module_types"])
def test_a_string_where_a_list_is_expected_is_refused(arg):
    with pytest.raises(ValueError, match=rf"`{arg}` must be a list of .* got the string 'net.0'. Write `\['net.0'\]`"):
        SoftQuantCallback(**{arg: "net.0"})


def test_include_narrows_and_exclude_removes():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5), nn.Linear(5, 2))
    names = lambda sel: [n for n, _ in sel.select(net)]  # noqa: E731
    assert names(LayerSelector()) == ["0.weight", "2.weight", "3.weight"]
    assert names(LayerSelector(include=["^[02]\\."])) == ["0.weight", "2.weight"]
    assert names(LayerSelector(include=["^[02]\\."], exclude=["^0"])) == ["2.weight"]
    assert names(LayerSelector(include=["weight"])) == ["0.weight", "2.weight", "3.weight"]  # never BatchNorm's
    assert names(LayerSelector(min_size=13)) == ["2.weight"]


def test_an_embedding_is_reached_through_module_types_and_the_error_says_so():
    gpt = CharGPT(10, 8, 1, 2, 16)
    with pytest.raises(ValueError, match=r"It matches \['tok_emb.weight'\], weights of modules not in `module_types`"):
        LayerSelector(include=["tok_emb"]).select_or_raise(gpt, "X")
    sel = LayerSelector(module_types=["Linear", "Embedding"], include=["emb", "head"])
    assert [n for n, _ in sel.select(gpt)] == ["tok_emb.weight", "pos_emb.weight", "head.weight"]


class _NoForward(pl.LightningModule):
    """The network in ``self.model`` and no ``forward``: a common way to write a LightningModule."""

    def __init__(self, manual=False):
        super().__init__()
        self.model = TinyNet(bn=True).net
        self.automatic_optimization = not manual
        self.logged = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        self.logged.append(batch_idx)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_batchnorm_is_re_estimated_through_training_step_when_there_is_no_forward():
    pl.seed_everything(0)
    train, _ = digits_loaders(shuffle=False)
    module = _NoForward()
    seen = {}

    class Probe(pl.Callback):
        def on_train_epoch_start(self, tr, pm):
            if tr.current_epoch == 2:  # after ClusterRefine snapped and re-estimated (it runs first)
                seen["bn"] = {k: v.clone() for k, v in pm.model[1].state_dict().items()}
                seen["net"] = copy.deepcopy(pm.model)
                seen["logged"] = len(pm.logged)

    refine = ClusterRefine(snap_epoch=2, w=0.45, snap=SnapConfig(on_unclustered="snap", recalibrate_bn_batches=5))
    trainer(max_epochs=3, callbacks=[SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=2), refine, Probe()]).fit(
        module, train)
    assert refine.snapped
    # Reference: the same re-estimation run directly on the snapped network.
    reference = recalibrate_batchnorm(copy.deepcopy(seen["net"]), train, num_batches=5)
    for key, value in reference[1].state_dict().items():
        torch.testing.assert_close(seen["bn"][key], value, rtol=1e-5, atol=1e-6)
    assert seen["logged"] == 2 * len(train) + 5  # the re-estimation ran training_step on 5 batches...
    assert "train/loss" in module.trainer.callback_metrics  # ...and the real steps still log


def test_no_forward_with_manual_optimization_skips_the_re_estimation_with_a_warning_at_setup():
    train, _ = digits_loaders()
    with pytest.warns(UserWarning, match="defines no `forward` and optimizes manually.*skipped"):
        trainer(max_epochs=2, callbacks=[SoftQuantCallback(stop_epoch=1), ClusterRefine(snap_epoch=1)]).fit(
            _NoForward(manual=True), train)
