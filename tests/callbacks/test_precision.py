"""SoftQuantCallback under mixed precision, gradient clipping, two optimizers, gradient
accumulation and bfloat16 weights: a real ``Trainer`` on TinyNet and the digits, CPU.

The coupling gradient is added in ``on_before_optimizer_step`` (docs/design.md section 1).
Lightning calls that hook after the backward pass, after AMP's loss scaler has unscaled
the gradients, once per optimizer step whatever ``accumulate_grad_batches`` is, and
*before* gradient clipping (``Precision._after_closure``: callbacks' hook, module hook,
then ``configure_gradient_clipping``). So the clipped gradient is that of the total loss
``L_task + L_C``, as if the coupling loss had been part of the loss: the coupling counts
toward the norm and is scaled down with the task gradient.

Every test puts a probe before and after the callback: their difference is the injected
gradient, compared with ``coupling_exact(θ, w_l, h_l).grad`` (``backend="exact"``).
"""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from sq_lightning.callbacks import SoftQuantCallback
from sq_lightning.ops.coupling import coupling_exact, layer_strength
from tests.helpers import TinyNet, digits_loaders, trainer

H, W, ALPHA = 1e-2, 0.3, 0.66
WEIGHTS = ("net.0.weight", "net.2.weight", "net.4.weight")


class GradProbe(Callback):
    """Weights and gradients at ``on_before_optimizer_step``, where it sits in the list."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters() if p.grad is not None}
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
        self.records.append({"optimizer": index, "grads": grads})


class StepProbe(Callback):
    """The gradients each ``optimizer.step`` used: after clipping, after the loss scaler."""

    def __init__(self) -> None:
        self.records: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}

        def record(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.records.append({names[id(p)]: p.grad.detach().clone() for p in params})

        for opt in trainer.optimizers:
            opt.register_step_post_hook(record)


def _fit(model=None, callbacks=(), h=H, max_steps=3, train=None, **trainer_kw):
    """Fits with probes around a SoftQuantCallback; returns ``(model, before, after, cb, trainer)``."""
    pl.seed_everything(0)
    model = model if model is not None else TinyNet()
    train = train if train is not None else digits_loaders()[0]
    before, after = GradProbe(), GradProbe()
    cb = SoftQuantCallback(h=h, w=W, alpha=ALPHA, backend="exact")
    t = trainer(max_steps=max_steps, callbacks=[before, cb, after, *callbacks], **trainer_kw)
    t.fit(model, train)
    return model, before, after, cb, t


def _sigma0(before: GradProbe) -> dict[str, float]:
    # σ_l is captured at the first coupled step, from the weights as they are then.
    return {n: float(theta.float().std()) for n, (theta, _) in before.records[0]["grads"].items() if n in WEIGHTS}


def _expected(name: str, theta: torch.Tensor, sigma0: dict[str, float], h: float = H) -> torch.Tensor:
    return coupling_exact(theta, W * sigma0[name], layer_strength(h, theta.numel(), ALPHA)).grad


def _assert_injected(added, after_grad, expected, name):
    """``added`` equals ``expected`` up to the rounding of ``grad + expected`` in ``grad``'s dtype.

    Elementwise bound ``eps · (|grad after| + |expected|)``: the cast of the float32
    coupling gradient to the gradient's dtype and the addition round by half an ulp each.
    """
    eps = torch.finfo(after_grad.dtype).eps
    expected = expected.float()
    err = (added.float() - expected).abs()
    bound = eps * (after_grad.float().abs() + expected.abs())
    worst = float((err - bound).max())
    assert worst <= 0, f"{name}: injected gradient off by {float(err.max()):.3g} (bound exceeded by {worst:.3g})"


def _check_every_step(before, after, sigma0, owned=None):
    """Each hook call added the exact coupling gradient to the weights it owns, nothing else.

    ``owned``: per optimizer index, the parameter names that optimizer steps (default: all).
    """
    assert len(before.records) == len(after.records) > 0
    for step, (rec_b, rec_a) in enumerate(zip(before.records, after.records)):
        own = None if owned is None else owned[rec_b["optimizer"]]
        for name, (theta, g0) in rec_b["grads"].items():
            g1 = rec_a["grads"][name][1]
            assert torch.isfinite(g1).all(), (step, name)
            added = g1.float() - g0.float()
            if name in WEIGHTS and (own is None or name in own):
                _assert_injected(added, g1, _expected(name, theta, sigma0), f"step {step} {name}")
                assert added.abs().max() > 0, (step, name)
            else:
                assert torch.equal(g1, g0), f"step {step}: {name} got a gradient it should not"


def _record_forward_dtype(model):
    """Dtypes of the first layer's outputs, to prove that autocast was on."""
    seen = []
    handle = model.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen, handle


# --- mixed precision -------------------------------------------------------------------


def test_bf16_mixed_injects_the_exact_coupling_gradient():
    model = TinyNet()
    seen, handle = _record_forward_dtype(model)
    model, before, after, cb, t = _fit(model, precision="bf16-mixed")
    handle.remove()
    assert t.precision == "bf16-mixed"
    assert set(seen) == {torch.bfloat16}, "the forward did not run under bf16 autocast"
    assert all(g.dtype == torch.float32 for _, g in after.records[0]["grads"].values())
    assert cb.steps_applied == 3
    _check_every_step(before, after, _sigma0(before))


def _check_fp16_amp(trainer_kw):
    """Runs fp16 AMP with a loss scaler; the hook must see (and leave) unscaled gradients."""
    model = TinyNet()
    seen, handle = _record_forward_dtype(model)
    steps = StepProbe()
    model, before, after, cb, t = _fit(model, callbacks=[steps], **trainer_kw)
    handle.remove()
    scaler = t.precision_plugin.scaler
    assert scaler is not None and scaler.get_scale() > 1, "no loss scaling: the test would not see a missing unscale"
    assert set(seen) == {torch.float16}
    # The loss is multiplied by ~65536 before backward: had the coupling been added to
    # scaled gradients (or the gradients been unscaled after it), it would be off by that.
    _check_every_step(before, after, _sigma0(before))
    # Nothing rescales after the injection: the optimizer steps on exactly these gradients.
    assert len(steps.records) == len(after.records) == 3
    for used, rec in zip(steps.records, after.records):
        for name, grad in used.items():
            assert torch.equal(grad, rec["grads"][name][1]), name


def test_16_mixed_flag_on_cpu():
    t = trainer(precision="16-mixed", max_steps=1)
    if t.precision != "16-mixed":
        pytest.skip(
            f"Lightning {pl.__version__} turns Trainer(accelerator='cpu', precision='16-mixed') into "
            f"{t.precision!r} ('AMP with fp16 is not supported on CPU'); fp16 AMP with a loss scaler is "
            "tested through the MixedPrecision plugin instead."
        )
    _check_fp16_amp(dict(precision="16-mixed"))


def test_fp16_amp_with_loss_scaler_through_the_plugin():
    # The Trainer flag refuses fp16 on CPU, but torch has CPU fp16 autocast and a CPU
    # GradScaler: the plugin exercises the real unscale -> hook -> scaler.step order.
    _check_fp16_amp(dict(plugins=[MixedPrecision("16-mixed", "cpu")]))


def test_bf16_true_weights_stay_finite_and_get_the_coupling_gradient():
    model, before, after, cb, t = _fit(precision="bf16-true", max_steps=5)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(g.dtype == torch.bfloat16 for _, g in after.records[0]["grads"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert cb.steps_applied == 5
    sigma0 = _sigma0(before)
    assert cb.coupler.sigma == pytest.approx(sigma0, rel=1e-6)
    _check_every_step(before, after, sigma0)
    # bf16 keeps 8 significant bits: the coupling survives the addition as a whole.
    for rec_b, rec_a in zip(before.records, after.records):
        for name in WEIGHTS:
            theta, g0 = rec_b["grads"][name]
            added = rec_a["grads"][name][1].float() - g0.float()
            expected = _expected(name, theta, sigma0)
            assert float((added - expected).norm() / expected.norm()) < 0.02, name


# --- gradient clipping -------------------------------------------------------------------


def _global_norm(grads: dict) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_coupling_is_added_before_gradient_clipping(algorithm):
    clip = 0.05 if algorithm == "norm" else 2e-3
    steps = StepProbe()
    model, before, after, cb, t = _fit(
        callbacks=[steps], gradient_clip_val=clip, gradient_clip_algorithm=algorithm, max_steps=4
    )
    sigma0 = _sigma0(before)
    # The probe after the callback, still before clipping, sees task + coupling unclipped.
    _check_every_step(before, after, sigma0)
    assert len(steps.records) == len(after.records) == 4
    for step, (rec_b, rec_a, used) in enumerate(zip(before.records, after.records, steps.records)):
        total = {n: g for n, (_, g) in rec_a["grads"].items()}
        task = {n: g for n, (_, g) in rec_b["grads"].items()}
        if algorithm == "norm":
            norm = _global_norm(total)
            assert norm > clip, "clipping was not active"
            assert _global_norm(used) <= clip * (1 + 1e-5), (step, float(_global_norm(used)))
            # torch.nn.utils.clip_grad_norm_ scales everything by clip / (norm + 1e-6).
            coef = clip / (norm + 1e-6)
            expect = {n: g * coef for n, g in total.items()}
        else:
            assert max(float(g.abs().max()) for g in total.values()) > clip, "clipping was not active"
            assert max(float(g.abs().max()) for g in used.values()) <= float(torch.tensor(clip)), step  # clip in float32
            expect = {n: g.clamp(-clip, clip) for n, g in total.items()}
        for name in total:
            torch.testing.assert_close(used[name], expect[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"step {step} {name}: {m}")
        # Clipping the task gradient alone and adding the coupling after it would give
        # something else: the coupling really goes through the clipping.
        if algorithm == "norm":
            late = {n: task[n] * min(1.0, clip / (float(_global_norm(task)) + 1e-6)) + (total[n] - task[n]) for n in total}
        else:
            late = {n: task[n].clamp(-clip, clip) + (total[n] - task[n]) for n in total}
        diff = max(float((late[n] - used[n]).abs().max()) for n in total)
        assert diff > 1e-3, f"step {step}: clipping before or after the coupling cannot be told apart"


# --- two optimizers, manual optimization ----------------------------------------------


class TwoOptimizerNet(TinyNet):
    """Optimizer 0 owns the first two linear layers, optimizer 1 the last one and steps
    every other batch, so between its steps optimizer 0 steps while ``net.4.weight``
    holds a gradient that is not its to touch."""

    OWNED = ({"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}, {"net.4.weight", "net.4.bias"})

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        first.step()
        first.zero_grad()
        if batch_idx % 2 == 1:
            second.step()
            second.zero_grad()

    def configure_optimizers(self):
        head = list(self.net[4].parameters())
        body = [p for p in self.parameters() if all(p is not q for q in head)]
        return torch.optim.SGD(body, lr=self.lr, momentum=self.momentum), torch.optim.SGD(head, lr=self.lr, momentum=self.momentum)


def test_two_optimizers_each_layer_gets_its_coupling_once_per_step_of_its_own_optimizer():
    pl.seed_everything(0)
    model = TwoOptimizerNet()
    before, after, steps = GradProbe(), GradProbe(), StepProbe()
    cb = SoftQuantCallback(h=H, w=W, alpha=ALPHA, backend="exact")
    trainer(max_epochs=1, limit_train_batches=6, callbacks=[before, cb, after, steps]).fit(model, digits_loaders()[0])
    order = [r["optimizer"] for r in before.records]
    assert order == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert cb.steps_applied == len(steps.records) == 9
    # At each hook call the stepping optimizer's weights get exactly the coupling
    # gradient and every other gradient is left alone, although net.4.weight holds one
    # during optimizer 0's steps.
    sigma0 = _sigma0(before)
    _check_every_step(before, after, sigma0, owned=dict(enumerate(TwoOptimizerNet.OWNED)))
    assert all("net.4.weight" in before.records[i]["grads"] for i, o in enumerate(order) if o == 0)
    # End to end: optimizer 1 steps on its two batches' task gradients (as they stood at
    # optimizer 0's step of the second batch) plus the coupling gradient, once.
    for i in (i for i, o in enumerate(order) if o == 1):
        theta, task = before.records[i - 1]["grads"]["net.4.weight"]
        used = steps.records[i]["net.4.weight"]
        torch.testing.assert_close(used - _expected("net.4.weight", theta, sigma0), task, rtol=0, atol=1e-7)


# --- gradient accumulation -----------------------------------------------------------


def test_accumulation_injects_once_per_optimizer_step_and_undivided():
    train3, _ = digits_loaders(batch_size=64, shuffle=False)
    model, before, after, cb, _ = _fit(train=train3, accumulate_grad_batches=3, max_steps=3)
    assert cb.steps_applied == len(before.records) == 3
    # Lightning divides the loss by 3 so the task gradient is the mean over 3 batches;
    # the coupling loss belongs to the optimizer step, not to a batch, and is added whole.
    _check_every_step(before, after, _sigma0(before))

    # Same first step as one batch of 3 x 64 samples: identical weights give identical
    # coupling, and the accumulated task gradient equals the big batch's up to rounding.
    big, _ = digits_loaders(batch_size=192, shuffle=False)
    _, before_big, after_big, _, _ = _fit(train=big, max_steps=1)
    for name, (theta, g_acc) in after.records[0]["grads"].items():
        theta_big, g_big = after_big.records[0]["grads"][name]
        assert torch.equal(theta, theta_big), name
        torch.testing.assert_close(g_acc, g_big, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
