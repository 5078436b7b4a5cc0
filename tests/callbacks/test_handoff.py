"""The hand-off between a training stage and ClusterRefine: nothing given twice, no window
aligned by hand, any ClusterSource works, and conflicts fail at setup."""

import ast
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sq_lightning.config import SnapConfig
from sq_lightning import ClusterRefine, ClusterSource, LearnedCodebook, SnapHint, SoftQuantCallback
from sq_lightning.handoff import find_source
from tests.helpers import TinyNet, digits_loaders, trainer

PACKAGE = Path(__file__).resolve().parents[2] / "sq_lightning"


def _capture_find(monkeypatch, refine):
    seen = {}
    find = refine.snapper.find

    def spy(model, w_l=None, centroids=None):
        seen["w_l"], seen["centroids"] = w_l, centroids
        return find(model, w_l=w_l, centroids=centroids)

    monkeypatch.setattr(refine.snapper, "find", spy)
    return seen


def test_snap_follows_the_coupling_window_and_its_w_l(monkeypatch):
    train, _ = digits_loaders()
    soft = SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=2)
    refine = ClusterRefine()
    seen = _capture_find(monkeypatch, refine)
    snapped_at = []
    monkeypatch.setattr(refine, "_recalibrate", lambda *a: None)
    run_snap = refine._run_snap
    monkeypatch.setattr(refine, "_run_snap", lambda t, m, **kw: (snapped_at.append(t.current_epoch), run_snap(t, m, **kw)))
    trainer(max_epochs=3, callbacks=[soft, refine]).fit(TinyNet(), train)
    assert snapped_at == [2]  # the coupling's stop_epoch, not given to ClusterRefine
    hint = soft.snap_hint()
    assert hint.w == 0.45 and set(hint.w_l) == set(seen["w_l"]) and len(hint.w_l) == 3
    for name, w_l in seen["w_l"].items():
        assert w_l == pytest.approx(0.45 * soft.coupler.sigma[name])  # the coupling's w_l = w · σ_l
    assert seen["centroids"] is None


def test_a_w_that_disagrees_with_the_coupling_fails_at_setup():
    train, _ = digits_loaders()
    cbs = [SoftQuantCallback(w=0.3, stop_epoch=1), ClusterRefine(w=0.45)]
    with pytest.raises(ValueError, match=r"`w`=0.45 but the SoftQuantCallback .* couples with `w`=0.3"):
        trainer(max_epochs=2, callbacks=cbs).fit(TinyNet(), train)
    # The same value twice is allowed (old configs say it on both).
    trainer(max_epochs=2, max_steps=2, callbacks=[SoftQuantCallback(w=0.3, stop_epoch=1), ClusterRefine(w=0.3)])


def test_two_training_stages_fail_at_setup():
    train, _ = digits_loaders()
    cbs = [SoftQuantCallback(stop_epoch=1), LearnedCodebook(bits=2, stop_epoch=1), ClusterRefine()]
    with pytest.raises(ValueError, match="2 training stages that cluster weights .*SoftQuantCallback, LearnedCodebook"):
        trainer(max_epochs=2, callbacks=cbs).fit(TinyNet(), train)


def test_without_a_training_stage_the_snap_is_at_fit_start():
    train, _ = digits_loaders()
    refine = ClusterRefine(snap=SnapConfig(recalibrate_bn_batches=0))
    t = trainer(max_epochs=1, max_steps=1, callbacks=[refine])
    t.fit(TinyNet(), train)
    assert refine._snap_at == 0 and refine.snapped


def test_a_stage_without_stop_epoch_snaps_at_fit_end(caplog):
    train, _ = digits_loaders()
    refine = ClusterRefine()
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=1, max_steps=3, callbacks=[SoftQuantCallback(), refine]).fit(TinyNet(), train)
    assert refine._snap_at is None and refine.snapped


class _FixedCentroids(Callback):
    """A user's own training stage: no sq_lightning base class, only the ClusterSource members."""

    provides = "centroids"
    start_epoch, stop_epoch = 0, None

    def __init__(self, centroids):
        self.centroids = centroids

    def is_active(self, trainer):
        return True

    def snap_hint(self):
        return SnapHint(centroids=self.centroids)

    def on_train_end(self, trainer, pl_module):  # runs before ClusterRefine's (callback order)
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_any_cluster_source_hands_over_its_centroids():
    train, _ = digits_loaders()
    net = TinyNet()
    centroids = {n: torch.tensor([-0.05, 0.0, 0.05]) for n, p in net.named_parameters() if n.endswith("weight")}
    source = _FixedCentroids(centroids)
    assert isinstance(source, ClusterSource)
    refine = ClusterRefine(snap=SnapConfig(placement="mean", on_unclustered="snap"))  # no stop_epoch: snaps at fit end
    trainer(max_epochs=1, max_steps=2, callbacks=[source, refine]).fit(net, train)
    params = dict(net.named_parameters())
    for name, c in centroids.items():
        assert refine.snapper.reports[name].k == 3 and torch.unique(params[name].detach()).numel() == 3
        # every weight went to the cluster of its nearest given centroid
        nearest = (source.before[name].reshape(-1, 1) - c).abs().argmin(1)
        assert torch.equal(refine.snapper.clusters[name].assignments.reshape(-1).long(), nearest)


def test_learned_codebook_hands_over_by_default():
    train, _ = digits_loaders()
    codebook = LearnedCodebook(lam=1.0, bits=2, stop_epoch=1)
    refine = ClusterRefine(snap=SnapConfig(placement="mean"))  # clusters_from="auto": the codebook
    trainer(max_epochs=2, callbacks=[codebook, refine]).fit(TinyNet(), train)
    assert refine._snap_at == 1
    # K = 4 everywhere, also where a layer fits its codebook badly (the fallback keeps the codebook's size)
    assert [r.k for r in refine.snapper.reports.values()] == [4, 4, 4]


def test_with_hint_gives_w_l_to_a_snap_without_a_coupling(monkeypatch):
    train, _ = digits_loaders()
    net = TinyNet()
    w_l = {n: 0.01 for n, p in net.named_parameters() if n.endswith("weight")}
    refine = ClusterRefine(snap=SnapConfig(recalibrate_bn_batches=0)).with_hint(SnapHint(w_l=w_l))
    seen = _capture_find(monkeypatch, refine)
    trainer(max_epochs=1, max_steps=1, callbacks=[refine]).fit(net, train)
    assert seen["w_l"] == w_l
    with pytest.raises(ValueError, match="must be a sq_lightning.handoff.SnapHint"):
        refine.with_hint({"w_l": w_l})


def test_find_source_ignores_other_callbacks():
    assert find_source([Callback(), ClusterRefine()]) is None
    soft = SoftQuantCallback()
    assert find_source([Callback(), soft, ClusterRefine()]) is soft


def test_no_callback_finds_another_by_class_name_or_private_member():
    """The package's callbacks meet only through sq_lightning.handoff."""
    for path in (PACKAGE / "callbacks").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "__name__":
                raise AssertionError(f"{path.name}:{node.lineno} compares a class name")
            if isinstance(node, ast.Attribute) and node.attr == "callbacks":
                assert path.name == "cluster_refine.py", f"{path.name}:{node.lineno} reads trainer.callbacks"
