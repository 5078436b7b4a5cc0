
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sq_lightning.config import SnapConfig
from sq_lightning.callbacks import SoftQuantCallback
from sq_lightning.coupler import WeightCoupler
from sq_lightning.ops.clustering import find_clusters
from sq_lightning.ops.coupling import coupling_exact, coupling_pairwise, layer_strength
from tests.helpers import TinyNet, accuracy, digits_loaders, trainer


class GradProbe(Callback):
    """Records every .grad at on_before_optimizer_step (runs where it sits in the list)."""

    def __init__(self):
        self.records = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.records.append(
            {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters() if p.grad is not None}
        )


def _clusters_needed(theta, gap, max_error=0.05):
    """Gap-separated clusters needed to snap ``theta`` within ``max_error`` relative error.

    Shrinks the split threshold until the snap error is small enough: tight groups
    separated by empty gaps need few clusters, an unclustered layer needs hundreds.
    """
    while True:
        c = find_clusters(theta, gap, merge="none")
        if c.snap_error(theta) <= max_error:
            return c.k
        gap /= 2


def _clusters(model, sigma, w=0.3):
    return {n: _clusters_needed(p, 0.5 * w * sigma[n]) for n, p in model.named_parameters() if n.endswith("weight")}


def test_injected_gradient_is_the_exact_coupling_gradient():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    before, after = GradProbe(), GradProbe()
    cb = SoftQuantCallback(h=1e-2, w=0.3, backend="exact")
    model = TinyNet()
    sigma0 = {n: float(p.detach().std()) for n, p in model.named_parameters() if n.endswith("weight")}
    trainer(max_steps=3, callbacks=[before, cb, after]).fit(model, train)
    assert len(before.records) == 3 and cb.steps_applied == 3
    for rec_b, rec_a in zip(before.records, after.records):
        for name, (theta, g0) in rec_b.items():
            added = rec_a[name][1] - g0
            if not name.endswith("weight"):
                assert torch.equal(added, torch.zeros_like(added)), name
                continue
            w_l = 0.3 * sigma0[name]
            h_l = layer_strength(1e-2, theta.numel(), 0.66)
            expected = coupling_exact(theta, w_l, h_l).grad
            torch.testing.assert_close(added, expected, rtol=1e-5, atol=1e-6)


class MetricSink(pl.loggers.Logger):
    """Keeps every logged scalar, by step."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    name, version = "sink", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass

    @property
    def experiment(self):
        return None


def test_grad_ratio_logging_is_refused_where_the_ratio_is_fixed_by_construction():
    with pytest.raises(ValueError, match="`log_grad_ratio=True` .* relative strength .* set `log_grad_ratio=False`"):
        SoftQuantCallback(log_grad_ratio=True)
    SoftQuantCallback(h=1e-3, log_grad_ratio=True)  # a fixed h: the ratio is a measurement


def test_grad_ratio_is_coupling_norm_over_task_norm():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    probe, sink = GradProbe(), MetricSink()
    cb = SoftQuantCallback(h=1e-2, w=0.3, backend="exact", log_every_n_steps=2, log_grad_ratio=True)
    model = TinyNet()
    sigma0 = {n: float(p.detach().std()) for n, p in model.named_parameters() if n.endswith("weight")}
    trainer(max_steps=5, callbacks=[probe, cb], logger=sink).fit(model, train)
    logged = [m for _, m in sink.metrics if "sq/grad_ratio_max" in m]
    assert len(logged) == 3  # steps 0, 2, 4
    for rec, metrics in zip(probe.records[::2], logged):
        ratios = []
        for name, (theta, task) in rec.items():
            if not name.endswith("weight"):
                assert f"sq/grad_ratio/{name}" not in metrics
                continue
            # Independent reference: the O(N^2) pairwise gradient.
            ref = coupling_pairwise(theta, 0.3 * sigma0[name], layer_strength(1e-2, theta.numel(), 0.66)).grad
            expected = float(ref.norm() / task.norm())
            assert metrics[f"sq/grad_ratio/{name}"] == pytest.approx(expected, rel=1e-4), name
            ratios.append(expected)
        assert metrics["sq/grad_ratio_max"] == pytest.approx(max(ratios), rel=1e-4)
    assert all(not any(k.startswith("sq/grad_ratio") for k in m) for _, m in sink.metrics if "sq/grad_ratio_max" not in m)


def test_ramp_scales_the_injected_gradient_geometrically():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    before, after, sink = GradProbe(), GradProbe(), MetricSink()
    cb = SoftQuantCallback(h=1e-2, w=0.3, backend="exact", ramp_steps=4, ramp_from=0.01, log_every_n_steps=1)
    model = TinyNet()
    sigma0 = {n: float(p.detach().std()) for n, p in model.named_parameters() if n.endswith("weight")}
    trainer(max_steps=6, callbacks=[before, cb, after], logger=sink).fit(model, train)
    # 0.01 -> 1 in four geometric steps, then the full strength.
    factors = [0.01, 0.01**0.75, 0.1, 0.01**0.25, 1.0, 1.0]
    assert [m["sq/h_scale"] for _, m in sink.metrics if "sq/h_scale" in m] == pytest.approx(factors)
    for factor, rec_b, rec_a in zip(factors, before.records, after.records, strict=True):
        for name, (theta, g0) in rec_b.items():
            if name.endswith("weight"):
                ref = coupling_pairwise(theta, 0.3 * sigma0[name], layer_strength(1e-2, theta.numel(), 0.66)).grad
                torch.testing.assert_close(rec_a[name][1] - g0, factor * ref, rtol=1e-4, atol=1e-7)


def test_target_step_calibration_ignores_the_ramp():
    torch.manual_seed(0)
    net = TinyNet().net
    plain, ramped = WeightCoupler(w=0.3, target_step=0.05), WeightCoupler(w=0.3, target_step=0.05)
    ramped.scale = 0.01
    assert ramped.calibrate(net, 0.1) == pytest.approx(plain.calibrate(net, 0.1))
    name = next(iter(plain.sigma))
    assert ramped.h_l(name) == pytest.approx(0.01 * plain.h_l(name)) and ramped.scale == 0.01


def test_grad_ratio_on_a_plain_module_skips_layers_without_grad():
    torch.manual_seed(0)
    net = TinyNet().net
    coupler = WeightCoupler(h=1e-2, w=0.3, backend="exact")
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    ratios = coupler.grad_ratios(net)
    assert set(ratios) == {"2.weight", "4.weight"}
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    coupler.add_gradients(net)
    for n, r in ratios.items():
        added = dict(net.named_parameters())[n].grad - grads[n]
        assert r == pytest.approx(float(added.norm() / grads[n].norm()), rel=1e-4)


def test_coupling_clusters_the_weights_far_more_than_plain_training():
    train, val = digits_loaders()
    results = {}
    for label, cbs in (("plain", []), ("coupled", [SoftQuantCallback(h=2e-3, w=0.3)])):
        pl.seed_everything(0)
        model = TinyNet()
        sigma = {n: float(p.detach().std()) for n, p in model.named_parameters()}
        trainer(max_epochs=12, callbacks=cbs).fit(model, train)
        results[label] = (_clusters(model, sigma), accuracy(model, val))
    plain, coupled = results["plain"][0], results["coupled"][0]
    print("clusters per layer (plain / coupled):", plain, coupled, "accuracy:", results["plain"][1], results["coupled"][1])
    for name in plain:
        assert coupled[name] * 2 <= plain[name], (name, plain[name], coupled[name])
    # The smallest layer clusters last (docs/design.md section 8); the big ones by far.
    assert sum(coupled.values()) * 5 <= sum(plain.values())
    assert results["coupled"][1] > results["plain"][1] - 0.05


def test_sigma_captured_at_start_and_frozen():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = TinyNet()
    cb = SoftQuantCallback(h=1e-3, w=0.3, start_epoch=1, rescale_every_n_steps=0)
    probe = GradProbe()
    t = trainer(max_epochs=3, callbacks=[probe, cb])
    t.fit(model, train)
    steps_per_epoch = len(train)
    assert cb.steps_applied == 2 * steps_per_epoch
    # σ_l is the std of the weights at the first coupled step (start of epoch 1).
    first = probe.records[steps_per_epoch]
    for name, (theta, _) in first.items():
        if name in cb.coupler.sigma:
            assert cb.coupler.sigma[name] == pytest.approx(float(theta.std()), rel=1e-6)


def test_sigma_follows_the_layer_scale_every_n_steps():
    """Weight decay shrinks the weights: the default re-measures σ_l, so w_l shrinks with them."""
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = TinyNet(weight_decay=1.0)
    cb = SoftQuantCallback(h=1e-4, w=0.3, rescale_every_n_steps=5)
    probe = GradProbe()
    trainer(max_epochs=1, max_steps=13, callbacks=[probe, cb]).fit(model, train)
    assert cb.steps_applied == 13
    # The last re-measure was at the 11th coupled step (index 10), on the weights before it.
    for name, (theta, _) in probe.records[10].items():
        if name in cb.coupler.sigma:
            assert cb.coupler.sigma[name] == pytest.approx(float(theta.std()), rel=1e-6)
            assert cb.coupler.sigma[name] < float(probe.records[0][name][0].std())


@pytest.mark.parametrize("ramp_epochs", [0, 3])
def test_resume_from_mid_run_checkpoint_is_exact(tmp_path, ramp_epochs):
    # No shuffling: a plain DataLoader's shuffle generator is not part of a checkpoint.
    train, _ = digits_loaders(shuffle=False)

    def run(max_epochs, ckpt_path=None, ckpt_cb=None):
        pl.seed_everything(0)
        model = TinyNet()
        # With a ramp the checkpoint (end of epoch 2) falls inside it.
        cbs = [SoftQuantCallback(h=2e-3, w=0.3, ramp_steps=ramp_epochs * len(train))] + ([ckpt_cb] if ckpt_cb else [])
        t = trainer(max_epochs=max_epochs, callbacks=cbs, enable_checkpointing=ckpt_cb is not None)
        t.fit(model, train, ckpt_path=ckpt_path)
        return model, cbs[0]

    full, cb_full = run(4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    run(2, ckpt_cb=ckpt)
    path = tmp_path / "epoch=1.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]
    assert any("sigma" in v for v in state.values())
    resumed, cb_res = run(4, ckpt_path=str(path))
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert cb_res.coupler.sigma == cb_full.coupler.sigma
    assert cb_res.steps_applied == cb_full.steps_applied


def test_frozen_and_unused_parameters_are_skipped():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = TinyNet()
    model.net[0].weight.requires_grad_(False)
    frozen_before = model.net[0].weight.detach().clone()
    trainer(max_steps=5, callbacks=[SoftQuantCallback(h=1e-2, w=0.3)]).fit(model, train)
    assert torch.equal(model.net[0].weight, frozen_before)


def test_gradient_accumulation_adds_once_per_optimizer_step():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    cb = SoftQuantCallback(h=1e-3, w=0.3)
    trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[cb]).fit(TinyNet(), train)
    assert cb.steps_applied == 4


def test_trainer_free_use_on_a_plain_module():
    torch.manual_seed(0)
    net = TinyNet().net
    coupler = WeightCoupler(h=1e-2, w=0.3, backend="histogram")
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    losses = coupler.add_gradients(net, compute_loss=True)
    assert set(losses) == {"0.weight", "2.weight", "4.weight"}
    for n, p in net.named_parameters():
        if n in losses:
            ref = coupling_exact(p, coupler.w_l(n), coupler.h_l(n))
            assert torch.allclose(p.grad - grads[n], ref.grad, rtol=0.05, atol=0.05 * float(ref.grad.abs().max()))
            assert float(losses[n]) == pytest.approx(float(ref.loss), rel=1e-3)


def test_non_finite_weights_fail_loudly_without_touching_grads():
    net = TinyNet().net
    coupler = WeightCoupler(h=1e-2, w=0.3)
    coupler.prepare(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite weights in \['0.weight'\]"):
        coupler.add_gradients(net)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"h": -1.0}, "`h` must be >= 0"),
        ({"w": 0.0}, "`w` must be > 0"),
        ({"w": float("nan")}, "`w` must be a finite number"),
        ({"backend": "gpu"}, "`backend` must be one of"),
        ({"n_bins": 8}, "`n_bins` must be an int >= 16"),
        ({"start_epoch": -1}, "`start_epoch` must be an int >= 0"),
        ({"start_epoch": 3, "stop_epoch": 2}, "`stop_epoch` \\(2\\) must be > `start_epoch`"),
        ({"start_step": 5, "stop_step": 5}, "`stop_step` \\(5\\) must be > `start_step`"),
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be an int >= 1"),
        ({"include": ["("]}, "`include` pattern '\\(' is not a valid regex"),
        ({"module_types": "Linear"}, "`module_types` must be a list"),
        ({"min_size": -3}, "`min_size` must be an int >= 0"),
        ({"ramp_steps": -1}, "`ramp_steps` must be an int >= 0"),
        ({"ramp_steps": 10, "ramp_from": 0.0}, "`ramp_from` must be a number in \\(0, 1\\]"),
        ({"ramp_steps": 10, "ramp_from": 2.0}, "`ramp_from` must be a number in \\(0, 1\\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftQuantCallback(**kwargs)


def test_selection_matching_nothing_fails_at_setup():
    train, _ = digits_loaders()
    cb = SoftQuantCallback(module_types=["Conv2d"])
    with pytest.raises(ValueError, match="no parameter of TinyNet was selected.*Widen `module_types`"):
        trainer(max_steps=1, callbacks=[cb]).fit(TinyNet(), train)


def test_fit_twice_on_the_same_trainer_and_module():
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model, cb = TinyNet(), SoftQuantCallback(h=1e-3, w=0.3, rescale_every_n_steps=0)
    t = trainer(max_epochs=1, callbacks=[cb])
    t.fit(model, train)
    sigma, steps = dict(cb.coupler.sigma), cb.steps_applied
    t.fit(model, train)  # max_epochs already reached: a no-op that must not fail
    t2 = trainer(max_epochs=2, callbacks=[cb])
    t2.fit(model, train)  # a second run on the same module and callback continues the coupling
    assert cb.coupler.sigma == sigma  # frozen at the first coupled step
    assert cb.steps_applied == steps + 2 * len(train)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_injected_gradient_on_cuda_matches_the_exact_gradient():
    # hidden=4096: layers of 262,144 and 131,072 weights take the histogram backend
    # (the Triton kernels where Triton is installed), the last one (320) the exact one.
    pl.seed_everything(0)
    train, _ = digits_loaders()
    before, after = GradProbe(), GradProbe()
    cb = SoftQuantCallback(h=1e-2, w=0.3, backend="auto")
    model = TinyNet(hidden=4096)
    sigma0 = {n: float(p.detach().std()) for n, p in model.named_parameters() if n.endswith("weight")}
    trainer(accelerator="cuda", deterministic=False, max_steps=3, callbacks=[before, cb, after]).fit(model, train)
    assert cb.steps_applied == 3
    for rec_b, rec_a in zip(before.records, after.records):
        for name, (theta, g0) in rec_b.items():
            if not name.endswith("weight"):
                continue
            added = (rec_a[name][1] - g0).cpu()
            assert rec_a[name][1].is_cuda
            expected = coupling_exact(theta.cpu(), 0.3 * sigma0[name], layer_strength(1e-2, theta.numel(), 0.66)).grad
            err = float((added - expected).norm() / expected.norm())
            assert err < (1e-5 if theta.numel() < 4096 else 0.02), (name, err)


def test_relative_strength_scales_each_layer_to_grad_ratio_times_the_task_gradient():
    """h=None: the injected gradient of every layer is grad_ratio · ‖task grad‖ along the exact
    coupling gradient (pairwise reference), whatever the layer's size."""
    from sq_lightning.ops.coupling import coupling_pairwise

    pl.seed_everything(0)
    train, _ = digits_loaders()
    before, after = GradProbe(), GradProbe()
    cb = SoftQuantCallback(w=0.3, grad_ratio=2.5, backend="exact")
    assert cb.relative
    trainer(max_steps=2, callbacks=[before, cb, after]).fit(TinyNet(), train)
    for step in range(2):
        for name in cb.coupler.sigma:  # 4096, 2048 and 320 weights
            theta, task = before.records[step][name]
            added = after.records[step][name][1] - task
            unit = coupling_pairwise(theta, cb.coupler.w_l(name), 1.0).grad
            assert float(added.norm()) == pytest.approx(2.5 * float(task.norm()), rel=1e-4)
            cos = float((added * unit).sum() / (added.norm() * unit.norm()))
            assert cos == pytest.approx(1.0, abs=1e-5), name


def test_relative_strength_on_the_histogram_backend_measures_the_norm_from_the_grid():
    """The histogram backend estimates ‖∂L_C/∂θ_l‖ from its grid in the same pass: the added
    gradient is grad_ratio · ‖task grad‖ within a fraction of a percent, along the exact direction."""
    from sq_lightning.ops.coupling import coupling_exact

    pl.seed_everything(0)
    train, _ = digits_loaders()
    before, after = GradProbe(), GradProbe()
    cb = SoftQuantCallback(w=0.3, backend="histogram")
    trainer(max_steps=3, callbacks=[before, cb, after]).fit(TinyNet(hidden=256), train)
    for step in range(3):
        for name in cb.coupler.sigma:
            theta, task = before.records[step][name]
            added = after.records[step][name][1] - task
            assert float(added.norm()) == pytest.approx(3.0 * float(task.norm()), rel=5e-3), (name, step)
            exact = coupling_exact(theta, cb.coupler.w_l(name), 1.0).grad
            cos = float((added * exact).sum() / (added.norm() * exact.norm()))
            assert cos > 0.99, (name, cos)


class AdamWNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2)


@pytest.mark.parametrize("net", [TinyNet, AdamWNet], ids=["sgd", "adamw"])
def test_default_strength_clusters_every_layer_with_sgd_and_adamw(net):
    """The defaults, no strength given: layers of 320 to 8192 weights all cluster in the window
    (snap error within max_snap_error without any fallback) with SGD and with AdamW."""
    from sq_lightning import ClusterRefine

    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = net(hidden=128)
    trainer(max_epochs=8, callbacks=[]).fit(model, train)  # a trained model first
    refine = ClusterRefine(snap=SnapConfig(on_unclustered="keep"))
    trainer(max_epochs=5, callbacks=[SoftQuantCallback(stop_epoch=4), refine]).fit(model, train)
    reports = refine.snapper.reports
    assert len(reports) == 3 and all(r.snapped for r in reports.values()), {n: r.snap_error for n, r in reports.items()}
    assert refine.snapper.summary()["bits_weighted"] <= 4.0
