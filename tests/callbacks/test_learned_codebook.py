"""LearnedCodebook with a real Trainer on a tiny MLP (64-32-10) and sklearn's 8x8 digits."""

import csv
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sq_lightning.callbacks.learned_codebook import LearnedCodebook
from sq_lightning.ops.codebook import codebook_regularizer, init_centroids, nearest_centroid

WEIGHTS = ("net.0.weight", "net.2.weight")


@pytest.fixture(autouse=True)
def _one_thread():
    # 64x32 matrices gain nothing from a second thread, and on busy shared cores the
    # threads' barrier waits made these tests about 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits(n_train=1400):
    """Standardized digits, fixed split: ``(x_train, y_train), (x_val, y_val)``."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:n_train], perm[n_train:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va])


def train_loader(batch_size=64):
    # No shuffling: a resumed run must see the batches of the uninterrupted one.
    return DataLoader(TensorDataset(*digits()[0]), batch_size=batch_size, shuffle=False, num_workers=0)


class MLP(pl.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def val_accuracy(model):
    x, y = digits()[1]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def make_trainer(**kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(**args)


class Probe(Callback):
    """Copies weights, gradients and (optionally) codebooks at every optimizer step."""

    def __init__(self, codebook=None):
        self.codebook, self.records = codebook, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: (p.detach().clone(), p.grad.clone()) for n, p in pl_module.named_parameters() if p.grad is not None}
        books = self.codebook.codebooks() if self.codebook is not None else None
        self.records.append((grads, books))


def analytic_grad(theta, c, tau):
    """``∂R/∂θ`` written out (hard: nearest centroid; soft: softmax weights)."""
    n = theta.numel()
    diff = theta.reshape(-1, 1) - c.reshape(1, -1)
    if tau == 0:
        return (2 / n * diff.gather(1, diff.abs().argmin(1, keepdim=True))).reshape(theta.shape)
    p = torch.softmax(-diff.square() / tau, dim=1)
    return (2 / n * (p * diff).sum(1)).reshape(theta.shape)


# ------------------------------------------------------------------ (a) injected gradient


@pytest.mark.parametrize("temperature", [0.0, 0.05])
def test_injected_gradient_is_lam_times_the_analytic_gradient(temperature):
    pl.seed_everything(0)
    lam, lr = 5.0, 1e-3
    # Linear init: far from the cluster means, so the codebook gradient is not ~0.
    cb = LearnedCodebook(lam=lam, bits=2, init="linear", temperature=temperature, codebook_lr=lr)
    before, after = Probe(cb), Probe(cb)
    make_trainer(max_steps=3, callbacks=[before, cb, after]).fit(MLP(), train_loader())
    assert len(before.records) == 3
    var0 = {n: float(before.records[0][0][n][0].var(correction=0)) for n in WEIGHTS}
    for (grads_b, books_b), (grads_a, books_a) in zip(before.records, after.records):
        assert set(books_b) == set(WEIGHTS)
        for name, (theta, g0) in grads_b.items():
            added = grads_a[name][1] - g0
            if name not in WEIGHTS:
                assert torch.equal(added, torch.zeros_like(added)), name
                continue
            expected = lam * analytic_grad(theta, books_b[name], temperature * var0[name])
            torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-9)
            assert expected.abs().max() > 0
    # The first Adam step on lam · ∂R/∂c: c - lr · g / (|g| + eps).
    (grads_b, books_b), (_, books_a) = before.records[0], after.records[0]
    for name in WEIGHTS:
        g = lam * codebook_regularizer(grads_b[name][0], books_b[name], temperature * var0[name]).grad_centroids
        assert g.abs().min() > 1e-6
        expected = (books_b[name] - lr * g / (g.abs() + 1e-8)).sort().values
        torch.testing.assert_close(books_a[name], expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ (b) clustering + accuracy


def test_training_then_snap_gives_k_values_and_keeps_accuracy(capsys):
    pl.seed_everything(0)
    plain = MLP()
    make_trainer(max_epochs=9).fit(plain, train_loader())
    acc_plain = val_accuracy(plain)
    # The plain run's best 4-level fit (k-means), relative to the layer variance.
    plain_err = {}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in WEIGHTS:
                c = init_centroids(p, 4, "kmeans")
                plain_err[name] = round(float(codebook_regularizer(p, c).value) / float(p.var()), 5)
                p.copy_(c[nearest_centroid(p, c)])
    acc_plain_snapped = val_accuracy(plain)  # post-training k-means, for the report only

    pl.seed_everything(0)
    model = MLP()
    cb = LearnedCodebook(lam=30.0, bits=2, start_epoch=3)
    make_trainer(max_epochs=9, callbacks=[cb]).fit(model, train_loader())
    acc_before_snap = val_accuracy(model)
    books = cb.codebooks()
    params = dict(model.named_parameters())
    err = {n: round(float(codebook_regularizer(params[n], books[n]).value) / float(params[n].var()), 5) for n in books}
    snapped = cb.snap(model)
    acc_snapped = val_accuracy(model)
    with capsys.disabled():
        print(
            f"\n[digits MLP, 2 bits] accuracy: plain {acc_plain:.4f} (k-means snapped {acc_plain_snapped:.4f}), "
            f"regularized {acc_before_snap:.4f}, regularized+snapped {acc_snapped:.4f}; "
            f"R/Var regularized {err} vs plain k-means {plain_err}"
        )
    assert set(snapped) == set(WEIGHTS)
    for name, (centroids, assignments) in snapped.items():
        assert torch.equal(centroids, centroids.sort().values)
        assert params[name].unique().numel() == 4, name
        assert torch.equal(params[name], centroids[assignments])
        assert err[name] < 0.2 * plain_err[name], name  # the weights did gather
    assert params["net.0.bias"].unique().numel() == 32  # biases are not selected
    assert acc_snapped >= acc_plain - 0.03


# ------------------------------------------------------------------ (c) resume


@pytest.mark.parametrize(("start_epoch", "temperature", "optimizer"), [(0, 0.01, "adam"), (1, 0.0, "sgd")])
def test_resume_equals_uninterrupted_run(tmp_path, start_epoch, temperature, optimizer):
    def callback():
        return LearnedCodebook(
            lam=10.0, bits=2, temperature=temperature, start_epoch=start_epoch, codebook_optimizer=optimizer,
            codebook_lr=1e-3 if optimizer == "adam" else 10.0,
        )

    pl.seed_everything(0)
    full, cb_full = MLP(), callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer(max_epochs=2, callbacks=[cb_full, ckpt], enable_checkpointing=True).fit(full, train_loader())

    pl.seed_everything(1)  # a different init: everything must come from the checkpoint
    resumed, cb_resumed = MLP(), callback()
    make_trainer(max_epochs=2, callbacks=[cb_resumed]).fit(resumed, train_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")

    for (name, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), name
    books_full, books_resumed = cb_full.codebooks(), cb_resumed.codebooks()
    assert set(books_full) == set(WEIGHTS) == set(books_resumed)
    for name in WEIGHTS:
        assert torch.equal(books_full[name], books_resumed[name]), name
    assert cb_full.state_dict()["steps"] == cb_resumed.state_dict()["steps"] == (2 - start_epoch) * 22


def test_state_dict_is_plain_and_loads_with_defaults():
    model = MLP()
    cb = LearnedCodebook(bits=1)
    cb.init_codebooks(model)
    state = cb.state_dict()
    assert state["centroids"]["net.0.weight"] == cb.codebooks()["net.0.weight"].tolist()
    assert all(isinstance(v, float) for v in state["weight_var"].values())
    other = LearnedCodebook(bits=1)
    other.load_state_dict({"centroids": state["centroids"]})  # an older, smaller state
    assert other.codebooks()["net.0.weight"].dtype == torch.float64  # not placed yet
    other.prepare(model)
    assert other.state_dict()["steps"] == 0 and other.state_dict()["optimizer"]["state"]["state"] == {}
    for name, c in cb.codebooks().items():
        assert torch.equal(other.codebooks()[name], c)
        assert torch.equal(other.snap(model)[name][0], c)


# ------------------------------------------------------------------ logging, optimizers, Trainer-free


def test_logs_the_weighted_regularizer(tmp_path):
    pl.seed_everything(0)
    cb = LearnedCodebook(lam=2.0, bits=2, log_every_n_steps=5)
    probe = Probe(cb)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(max_steps=20, logger=logger, log_every_n_steps=5, callbacks=[probe, cb])
    trainer.fit(MLP(), train_loader())
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("sq/codebook_reg")]
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]  # logger steps count from 0
    # The value at optimizer step 5 is lam · Σ R_l on the weights and codebooks it saw.
    grads, books = probe.records[4]
    expected = sum(2.0 * float(codebook_regularizer(grads[n][0], books[n]).value) for n in WEIGHTS)
    assert math.isclose(float(rows[0]["sq/codebook_reg"]), expected, rel_tol=1e-5)


class TwoOptimizers(MLP):
    """Manual optimization, one optimizer per layer: each hook call owns one layer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opts = self.optimizers()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        for opt in opts:
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[i].parameters(), lr=0.1) for i in (0, 2)]


def test_each_optimizer_gets_the_gradient_of_its_own_layers_once():
    pl.seed_everything(0)
    cb = LearnedCodebook(lam=5.0, bits=2)
    before, after = Probe(cb), Probe(cb)
    make_trainer(max_steps=2, callbacks=[before, cb, after]).fit(TwoOptimizers(), train_loader())
    assert len(before.records) == 2  # one hook call per optimizer (max_steps counts the first)
    for owned, ((grads_b, books), (grads_a, _)) in zip(WEIGHTS, zip(before.records, after.records)):
        assert owned in grads_b
        for name in set(WEIGHTS) & set(grads_b):  # the first step's zero_grad cleared net.0
            theta, g0 = grads_b[name]
            added = grads_a[name][1] - g0
            expected = 5.0 * analytic_grad(theta, books[name], 0.0) if name == owned else torch.zeros_like(added)
            torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-9)


def test_window_and_trainer_free_core():
    pl.seed_everything(0)
    model = MLP()
    cb = LearnedCodebook(
        lam=1.0, bits=None, k=3, k_overrides={r"net\.2": 5}, init="linear", start_epoch=1, stop_epoch=2
    )
    make_trainer(max_epochs=2, max_steps=22, callbacks=[cb]).fit(model, train_loader())
    assert cb.codebooks() == {}  # stopped after epoch 0: the window had not started
    books = cb.init_codebooks(model)
    assert {n: c.numel() for n, c in books.items()} == {"net.0.weight": 3, "net.2.weight": 5}
    w = model.net[0].weight
    torch.testing.assert_close(books["net.0.weight"], torch.linspace(float(w.min()), float(w.max()), 3))
    model.zero_grad()
    nn.functional.cross_entropy(model(digits()[0][0][:32]), digits()[0][1][:32]).backward()
    g0 = w.grad.clone()
    value = cb.step(model)
    expected = sum(float(codebook_regularizer(p, books[n]).value) for n, p in model.named_parameters() if n in books)
    assert math.isclose(float(value), expected, rel_tol=1e-5)
    torch.testing.assert_close(w.grad - g0, analytic_grad(w.detach(), books["net.0.weight"], 0.0), rtol=1e-4, atol=1e-9)
    snapped = cb.snap(model)
    assert torch.equal(w, snapped["net.0.weight"][0][nearest_centroid(w, snapped["net.0.weight"][0])])


def test_stop_epoch_freezes_codebooks():
    pl.seed_everything(0)
    cb = LearnedCodebook(lam=1.0, bits=2, start_epoch=0, stop_epoch=1)
    probe = Probe(cb)
    make_trainer(max_epochs=2, callbacks=[cb, probe]).fit(MLP(), train_loader())
    assert cb.state_dict()["steps"] == 22
    assert all(torch.equal(cb.codebooks()[n], probe.records[22][1][n]) for n in WEIGHTS)


def test_gradient_accumulation_steps_once_per_optimizer_step():
    pl.seed_everything(0)
    cb = LearnedCodebook(lam=1.0, bits=2)
    probe = Probe(cb)
    make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb, probe]).fit(MLP(), train_loader())
    assert cb.state_dict()["steps"] == len(probe.records) == 3


def test_loss_scaler_overflow_skips_the_step_in_the_hook():
    # What the fp16 mixed-precision plugin looks like to the hook (no fp16 AMP on CPU).
    x, y = digits()[0]
    model, cb = MLP(), LearnedCodebook(lam=1.0, bits=2)
    cb.init_codebooks(model)
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    model.net[0].weight.grad[0, 0] = float("inf")
    grads = [p.grad.clone() for p in model.parameters()]
    books = cb.codebooks()
    amp = SimpleNamespace(sanity_checking=False, current_epoch=0, precision_plugin=SimpleNamespace(scaler=object()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_before_optimizer_step(amp, model, optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(c, books[n]) for n, c in cb.codebooks().items())
    plain = SimpleNamespace(sanity_checking=False, current_epoch=0, precision_plugin=SimpleNamespace())
    with pytest.raises(RuntimeError, match=r"gradient of `net.0.weight` holds NaN or inf"):
        cb.on_before_optimizer_step(plain, model, optimizer)


# ------------------------------------------------------------------ (d) errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1}, r"`lam` must be a finite number >= 0, got -1\."),
        ({"lam": float("inf")}, r"`lam` must be a finite number >= 0, got inf\."),
        ({"bits": 2, "k": 8}, r"Pass exactly one of `bits` and `k`, got bits=2 and k=8\. .*`bits=None`"),
        ({"bits": None}, r"Pass exactly one of `bits` and `k`, got bits=None and k=None"),
        ({"bits": 17}, r"`bits` must be an int in \[0, 16\], got 17\."),
        ({"bits": 1.5}, r"`bits` must be an int in \[0, 16\], got 1\.5\."),
        ({"bits": None, "k": 0}, r"`k` must be an int >= 1, got 0\."),
        ({"k_overrides": {"fc(": 4}}, r"`k_overrides` pattern 'fc\(' is not a valid regex"),
        ({"k_overrides": {"fc": 0}}, r"`k_overrides\['fc'\]` must be an int >= 1, got 0\."),
        ({"k_overrides": [("fc", 4)]}, r"`k_overrides` must be a dict of regex -> K, got list\."),
        ({"init": "median"}, r"`init` must be one of \['linear', 'quantile', 'kmeans'\], got 'median'\."),
        ({"temperature": -0.1}, r"`temperature` must be a finite number >= 0, got -0\.1\."),
        ({"codebook_lr": 0.0}, r"`codebook_lr` must be a finite number > 0, got 0\.0\."),
        ({"codebook_optimizer": "rmsprop"}, r"`codebook_optimizer` must be one of \['adam', 'sgd'\], got 'rmsprop'\."),
        ({"start_epoch": -1}, r"`start_epoch` must be an int >= 0, got -1\."),
        ({"start_epoch": 2, "stop_epoch": 2}, r"`stop_epoch` \(2\) must be > `start_epoch` \(2\): the window would be empty"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be an int >= 1, got 0\."),
        ({"min_size": -1}, r"`min_size` must be an int >= 0, got -1\."),
        ({"include": ["("]}, r"`include` pattern '\(' is not a valid regex"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedCodebook(**kwargs)


def test_setup_errors():
    with pytest.raises(ValueError, match=r"no parameter of MLP was selected .*Widen `module_types`/`include`"):
        make_trainer(callbacks=[LearnedCodebook(module_types=["Conv2d"])]).fit(MLP(), train_loader())
    with pytest.raises(ValueError, match=r"LearnedCodebook: `start_epoch`=2 but the Trainer stops after `max_epochs`=2 .*never run"):
        make_trainer(max_epochs=2, callbacks=[LearnedCodebook(start_epoch=2)]).fit(MLP(), train_loader())


def test_small_layer_warns():
    with pytest.warns(UserWarning, match=r"`net.2.weight` has 320 entries, fewer than its K=512"):
        LearnedCodebook(bits=9).prepare(MLP())


class NanLoss(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_nonfinite_gradient_in_training_raises():
    with pytest.raises(RuntimeError, match=r"gradient of `net.0.weight` holds NaN or inf\. .*lower the learning rate"):
        make_trainer(max_steps=1, callbacks=[LearnedCodebook()]).fit(NanLoss(), train_loader())


def test_nonfinite_weight_codebook_gradient_raise_trainer_free():
    x, y = digits()[0]
    model, cb = MLP(), LearnedCodebook()
    with pytest.raises(RuntimeError, match=r"`snap` needs codebooks.*`init_codebooks\(model\)`"):
        cb.snap(model)
    with pytest.raises(RuntimeError, match=r"`step` needs codebooks; call `init_codebooks\(model\)` first"):
        cb.step(model)
    cb.init_codebooks(model)
    assert cb.step(model) is None  # no gradient yet: nothing to do
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    state = cb.state_dict()
    state["centroids"]["net.0.weight"][0] = float("inf")  # a corrupted checkpoint
    cb.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"codebook of `net.0.weight` holds NaN or inf\. .*lower `codebook_lr`"):
        cb.step(model)

    model, cb = MLP(), LearnedCodebook()
    cb.init_codebooks(model)
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    model.net[2].weight.grad[0, 0] = float("inf")
    g = model.net[0].weight.grad.clone()
    assert cb.step(model, skip_nonfinite_grads=True) is None  # the loss scaler's overflow case
    assert torch.equal(model.net[0].weight.grad, g)
    with pytest.raises(RuntimeError, match=r"gradient of `net.2.weight` holds NaN or inf"):
        cb.step(model)
    with torch.no_grad():
        model.net[2].weight[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"weight `net.2.weight` holds NaN or inf\. .*diverged"):
        cb.step(model, skip_nonfinite_grads=True)
    with pytest.raises(RuntimeError, match=r"weight `net.2.weight` holds NaN or inf; cannot build its codebook"):
        cb.init_codebooks(model)


def test_checkpoint_mismatch_errors():
    model, cb = MLP(), LearnedCodebook(bits=2)
    cb.init_codebooks(model)
    state = cb.state_dict()
    other = LearnedCodebook(bits=2, exclude=["net.2"])
    other.prepare(model)
    match = r"codebooks for \['net.0.weight', 'net.2.weight'\], but the callback selects \['net.0.weight'\]\. Select"
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)
    other = LearnedCodebook(bits=3)
    other.prepare(model)
    with pytest.raises(ValueError, match=r"codebook of `net.0.weight` has 4 centroids, but the callback asks for K=8"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"codebook optimizer is 'adam', `codebook_optimizer` is 'sgd'"):
        LearnedCodebook(bits=2, codebook_optimizer="sgd").load_state_dict(state)
    with pytest.raises(ValueError, match=r"there is a codebook for `net.0.weight`, which Sequential lacks"):
        cb.snap(nn.Sequential(nn.Linear(2, 2)))
