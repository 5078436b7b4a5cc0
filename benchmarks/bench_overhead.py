"""Training-step overhead of the soft-quantization coupling gradient (CPU): CIFAR ResNet-20, torchvision
ResNet-18 or the character GPT (``--model``).

Soft quantization (Bernstein, Di Carlo, Schwab, arXiv:2601.21219) adds the gradient of
the weight-coupling loss to ``param.grad`` between ``backward`` and ``optimizer.step``
(what ``SoftQuantCallback.on_before_optimizer_step`` does). This script measures what
that costs per training step.

Plain loop: the ``--model`` (ResNet-20 by default; see :func:`_setup_model`), a batch of random
inputs, cross-entropy, its optimizer. Each round times one step WITHOUT the
coupling and one step WITH it for every backend (``auto``, ``histogram``, ``exact``),
in an order rotated every round, all in one process; the reported overhead is the
median over rounds of (step with coupling) / (step without) of the same round, with
the 25-75 % spread. The coupling call alone is timed inside the step it belongs to.
``log step`` is the coupling call that also computes the loss value (what the
callback does every ``log_every_n_steps`` steps). Targets (issues 2 and 48): ratio <= 1.05 on
torchvision ResNet-18, <= 1.03 on ResNet-20 and the character GPT.

Peak extra memory of one coupling call (after the timed rounds, so that it does not
disturb them): glibc's mmap threshold is fixed at 64 KiB (``mallopt``), so that every
allocation of 64 KiB or more (torch tensors, numpy arrays) takes fresh pages and returns
them when freed; the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
during the call minus the resident set before it is the memory the call needed at its
peak. Maximum over 3 calls; reported in MiB and as a percentage of the model's
parameter + gradient + optimizer-state memory. Linux only (``n/a`` elsewhere).

Lightning variant (``--trainer-fits``, 0 disables): alternating short ``Trainer.fit``
runs of :class:`sq_lightning.models.ImageClassifier` with ``SoftQuantCallback`` and
without any, a callback timing each training batch (forward, backward, coupling,
optimizer step); the first ``--trainer-skip`` batches of every fit are dropped.

Usage::

    python benchmarks/bench_overhead.py [--threads 2] [--batch 128] [--rounds 30]
        [--backends auto histogram exact] [--trainer-fits 6] [--trainer-steps 10]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
import torch.nn.functional as F

import _common as C
from sq_lightning.coupler import WeightCoupler
from sq_lightning.models import resnet20

RESULTS = C.RESULTS_DIR / "overhead.md"
H, W = 1e-3, 0.3
TARGET = {"resnet20": 1.03, "resnet18": 1.05, "gpt": 1.03}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_extra_bytes(fn, repeats: int = 3):
    """Peak resident memory ``fn()`` adds, in bytes (max over ``repeats`` calls), or None off Linux.

    Fixes glibc's mmap threshold at 64 KiB first, so every large allocation takes fresh
    pages: call it after the timed rounds (it changes the allocator's behaviour).
    """
    import ctypes
    import gc

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: freed heap goes back at once
        fn()
        peak = 0
        for _ in range(repeats):
            gc.collect()
            libc.malloc_trim(0)
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            fn()
            peak = max(peak, _status_kib("VmHWM") - before)
        return 1024 * peak
    except (OSError, KeyError, AttributeError):
        return None


def training_state_bytes(model, opt) -> int:
    """Parameters + gradients + optimizer state, in bytes."""
    n = sum(2 * p.numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return n


class _CodebookArm:
    """Method B in the same harness: LearnedCodebook's per-step work (its gradient injection
    into the weights and the step of its own codebook optimizer), 2 bits, kmeans init."""

    def __init__(self, model) -> None:
        from sq_lightning.callbacks import LearnedCodebook

        self.cb = LearnedCodebook(lam=30.0, bits=2, init="kmeans")

    def prepare(self, model) -> None:
        self.cb.prepare(model)
        self.cb.init_codebooks(model)

    def add_gradients(self, model, compute_loss: bool = False):
        return self.cb.step(model)


class _RelativeArm:
    """SoftQuantCallback's default relative strength (``h=None``, ``grad_ratio=3``): its per-step
    work, on the same selection as the other arms."""

    def __init__(self, model, selector) -> None:
        from sq_lightning.callbacks import SoftQuantCallback

        self.cb = SoftQuantCallback(w=W)
        self.cb.coupler = WeightCoupler(h=1.0, w=W, alpha=0.0, backend="auto", selector=selector)

    def prepare(self, model) -> None:
        self.cb.coupler.prepare(model)

    def add_gradients(self, model, compute_loss: bool = False):
        return self.cb._add_relative(model, list(model.parameters()), compute_loss)


def _setup_model(name: str, batch: int):
    """``(model, inputs, targets, loss_fn, optimizer, selector, label)`` of the model measured.

    ``resnet20``: CIFAR ResNet-20, 3x32x32 inputs, SGD (momentum 0.9). ``resnet18``: torchvision's
    ResNet-18 with 10 classes on 3x32x32 inputs, SGD. ``gpt``: the Tiny Shakespeare character GPT
    (4 x 192, 1.82 M parameters), ``batch`` blocks of 128 tokens, AdamW; its attention and MLP
    weights are coupled, the output head is not (as in ``configs/shakespeare_gpt_*.yaml``).
    """
    from sq_lightning.layers import LayerSelector

    if name == "gpt":
        from sq_lightning.models import CharGPT

        model = CharGPT(65, 128, 4, 4, 192)
        x = torch.randint(0, 65, (batch, 128))
        y = torch.randint(0, 65, (batch, 128))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
        return (model, x, y, lambda out, t: F.cross_entropy(out.reshape(-1, 65), t.reshape(-1)), opt,
                LayerSelector(exclude=["^head\\."]), f"character GPT 4 x 192, batch {batch} x 128 tokens, AdamW")
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        label = f"torchvision ResNet-18, batch {batch}, 3x32x32, SGD"
    else:
        model = resnet20()
        label = f"ResNet-20, batch {batch}, SGD"
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, x, y, F.cross_entropy, opt, LayerSelector(), label


def plain_loop(args) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    model, x, y, loss_fn, opt, selector, label = _setup_model(args.model, args.batch)
    def arm(b):
        if b == "codebook":
            return _CodebookArm(model)
        if b == "relative":
            return _RelativeArm(model, selector)
        return WeightCoupler(h=H, w=W, backend=b, selector=selector)

    couplers = {b: arm(b) for b in args.backends}
    for c in couplers.values():
        c.prepare(model)  # σ_l captured once, as the callback does at its first step
    coupling_time: dict[str, list[float]] = {b: [] for b in args.backends}

    def step(backend: str | None, compute_loss: bool = False) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if backend is not None:
            t0 = time.perf_counter()
            couplers[backend].add_gradients(model, compute_loss=compute_loss)
            coupling_time[backend].append(time.perf_counter() - t0)
        opt.step()
        return time.perf_counter() - start

    arms = ["none", *args.backends]
    for _ in range(args.warmup):
        for a in arms:
            step(None if a == "none" else a)
    for b in args.backends:
        coupling_time[b].clear()
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for a in order:
            times[a].append(step(None if a == "none" else a))
        print(f"\rround {r + 1}/{args.rounds}", end="", flush=True)
    print()
    # The loss-computing call (logging steps), timed alone after the rounds.
    log_time: dict[str, list[float]] = {}
    for b in args.backends:
        log_time[b] = []
        for _ in range(max(3, args.rounds // 5)):
            t0 = time.perf_counter()
            couplers[b].add_gradients(model, compute_loss=True)
            log_time[b].append(time.perf_counter() - t0)
    # Peak extra memory of one coupling call (gradients present, as in a step), measured last.
    state = training_state_bytes(model, opt)
    peak: dict[str, object] = {}
    for b in args.backends:
        peak[b] = peak_extra_bytes(lambda: couplers[b].add_gradients(model))
    n_coupled = sum(p.numel() for _, p in selector.select(model))
    target = TARGET[args.model]

    base = times["none"]
    rows = [
        f"Plain loop: {label}, {n_coupled / 1e6:.2f} M weights coupled, "
        f"h={H}, w={W}, {args.rounds} rounds after "
        f"{args.warmup} warm-up round(s); every round runs one step per arm in rotated order.",
        "",
        "| backend | step ratio with/without: median [p25, p75] | ratio of medians | step without (ms) | "
        "step with (ms) | coupling call (ms) [p25, p75] | ns per coupled weight | coupling / step | "
        f"log step: coupling + loss (ms) | peak extra memory, MiB (% of params + grads + optimizer state, "
        f"{state / 2**20:.1f} MiB) | target <= {target} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    summary = {}
    for b in args.backends:
        rr = C.ratios(times[b], base)
        med = C.median(rr)
        ct = [1e3 * t for t in coupling_time[b]]
        summary[b] = med
        rows.append(
            f"| {b} | {med:.4f} {C.spread(rr, '{:.4f}')} | {C.median(times[b]) / C.median(base):.4f} | "
            f"{1e3 * C.median(base):.1f} | {1e3 * C.median(times[b]):.1f} | {C.median(ct):.2f} {C.spread(ct, '{:.2f}')} | "
            f"{1e6 * C.median(ct) / n_coupled:.2f} | "
            f"{C.median(ct) / (1e3 * C.median(base)):.4f} | {1e3 * C.median(log_time[b]):.2f} | "
            f"{'n/a' if peak[b] is None else f'{peak[b] / 2**20:.2f} ({100 * peak[b] / state:.1f} %)'} | "
            f"{'yes' if med <= target else 'NO'} |"
        )
    return rows, summary


def peer_loop(args) -> list[str]:
    """Step time of each training-time method on its own copy of ResNet-20, alternately.

    Arms: plain SGD step; the same + soft quantization (``WeightCoupler``, auto);
    the same + method B (``LearnedCodebook``, 2 bits); the plain step with the loss of
    ``ImageClassifier(distill_from=...)`` instead of cross-entropy (a frozen ResNet-20
    teacher's forward + KL, weight 1, T 1); coremltools' DKM palettization
    (``DKMPalettizer`` prepared model + ``palettizer.step()``) at each ``--dkm-bits``.
    """
    import tempfile

    from sq_lightning.models import ImageClassifier

    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = resnet20()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    arms: dict[str, dict] = {}

    def add(name: str, model, extra=None, after=None, loss=None) -> None:
        arms[name] = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      "extra": extra, "after": after, "loss": loss or (lambda logits: F.cross_entropy(logits, y))}

    import copy

    add("plain SGD step", copy.deepcopy(base))
    m = copy.deepcopy(base)
    cpl = WeightCoupler(h=H, w=W)
    cpl.prepare(m)
    add("+ soft quantization (auto)", m, extra=lambda mm: cpl.add_gradients(mm))
    m = copy.deepcopy(base)
    cb = _CodebookArm(m)
    cb.prepare(m)
    add("+ method B (2 bits)", m, extra=lambda mm: cb.add_gradients(mm))
    with tempfile.TemporaryDirectory() as d:
        torch.save(base.state_dict(), f"{d}/teacher.pt")
        student = ImageClassifier(arch="resnet20", distill_from=f"{d}/teacher.pt", distill_weight=1.0,
                                  distill_temperature=1.0)
        student.load_teacher()
    student.model.load_state_dict(base.state_dict())
    add("distillation loss (teacher forward + KL)", student.model, loss=lambda logits: student.distillation_loss(logits, x))
    for bits in args.dkm_bits:
        cfg = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": bits, "weight_threshold": 0, "milestone": 0}})
        pal = DKMPalettizer(copy.deepcopy(base), cfg)
        add(f"coremltools DKM ({bits} bits)", pal.prepare(), after=pal.step)

    def step(name: str) -> float:
        a = arms[name]
        start = time.perf_counter()
        a["opt"].zero_grad(set_to_none=True)
        a["loss"](a["model"](x)).backward()
        if a["extra"] is not None:
            a["extra"](a["model"])
        a["opt"].step()
        if a["after"] is not None:
            a["after"]()
        return time.perf_counter() - start

    names = list(arms)
    for _ in range(args.warmup):
        for n in names:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.peer_rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(step(n))
        print(f"\rpeer round {r + 1}/{args.peer_rounds}", end="", flush=True)
    print()
    base_t = times[names[0]]
    rows = [
        f"Training-time methods side by side: ResNet-20, batch {args.batch}, each arm on its own copy of the model "
        f"with its own SGD (lr 0.01, momentum 0.9), {args.peer_rounds} rounds in rotated order after "
        f"{args.warmup} warm-up round(s). DKM: every conv/linear weight, clustering from the first step.",
        "",
        "| arm | step (ms) [p25, p75] | / plain step, per round [p25, p75] |",
        "| --- | ---: | ---: |",
    ]
    for n in names:
        rr = C.ratios(times[n], base_t)
        rows.append(f"| {n} | {1e3 * C.median(times[n]):.1f} {C.spread([1e3 * t for t in times[n]], '{:.1f}')} | "
                    f"{C.median(rr):.3f} {C.spread(rr, '{:.3f}')} |")
    return rows


def trainer_variant(args) -> list[str]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from sq_lightning.callbacks import SoftQuantCallback
    from sq_lightning.models import ImageClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class BatchTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._t0)

    torch.manual_seed(0)
    n = args.batch * args.trainer_steps
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
    module = ImageClassifier(arch="resnet20", lr=0.01, momentum=0.9, schedule="constant")
    sq = SoftQuantCallback(h=H, w=W, backend=args.trainer_backend, histogram_every_n_epochs=0)

    def fit(with_sq: bool) -> list[float]:
        timer = BatchTimer()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=[timer, sq] if with_sq else [timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        torch.set_num_threads(args.threads)  # in case the Trainer changed it
        return timer.times[args.trainer_skip :]

    per_fit = {"none": [], "sq": []}
    pooled = {"none": [], "sq": []}
    for i in range(args.trainer_fits):
        for arm in (("none", "sq") if i % 2 == 0 else ("sq", "none")):
            t = fit(arm == "sq")
            per_fit[arm].append(C.median(t))
            pooled[arm].extend(t)
        print(f"\rtrainer fit pair {i + 1}/{args.trainer_fits}", end="", flush=True)
    print()
    rr = C.ratios(per_fit["sq"], per_fit["none"])
    return [
        f"Lightning `Trainer`: ImageClassifier(resnet20), SoftQuantCallback(h={H}, w={W}, backend="
        f"'{args.trainer_backend}') vs no callback; {args.trainer_fits} pairs of alternating fits of "
        f"{args.trainer_steps} batches, first {args.trainer_skip} batches of each fit dropped; "
        "time from on_train_batch_start to on_train_batch_end.",
        "",
        "| arm | median batch (ms) [p25, p75] | batches timed |",
        "| --- | ---: | ---: |",
        *[
            f"| {a} | {1e3 * C.median(pooled[a]):.1f} {C.spread([1e3 * t for t in pooled[a]], '{:.1f}')} | {len(pooled[a])} |"
            for a in ("none", "sq")
        ],
        "",
        f"Ratio with/without, per fit pair: median {C.median(rr):.4f} {C.spread(rr, '{:.4f}')}; "
        f"ratio of pooled medians {C.median(pooled['sq']) / C.median(pooled['none']):.4f}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--model", choices=["resnet20", "resnet18", "gpt"], default="resnet20",
                        help="resnet20 (CIFAR), resnet18 (torchvision, CIFAR-sized input) or gpt (Tiny Shakespeare)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (one step per arm each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--backends", nargs="+", default=["auto", "histogram", "exact"],  # also: codebook (method B), relative (h=None)
                        choices=["auto", "histogram", "exact", "codebook", "relative"])
    parser.add_argument("--trainer-fits", type=int, default=6, help="pairs of Trainer fits (0: skip the Lightning variant)")
    parser.add_argument("--trainer-steps", type=int, default=10, help="batches per Trainer fit")
    parser.add_argument("--trainer-skip", type=int, default=2, help="batches dropped at the start of each fit")
    parser.add_argument("--trainer-backend", default="auto", choices=["auto", "histogram", "exact"])
    parser.add_argument("--peer-rounds", type=int, default=0,
                        help="rounds of the side-by-side with method B and coremltools DKM (0: skip; needs coremltools)")
    parser.add_argument("--dkm-bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain-loop backend comparison")
    parser.add_argument("--no-save", action="store_true", help=f"print only, do not append to {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = C.uptime()

    rows: list[str] = []
    if not args.skip_plain:
        rows, summary = plain_loop(args)
        print("\n".join(rows))
    if args.peer_rounds > 0:
        peer = peer_loop(args)
        print("\n".join(peer))
        rows += ["", *peer]
    if args.trainer_fits > 0:
        rows += ["", *trainer_variant(args)]
        print("\n".join(rows[-8:]))
    notes = [
        "Times are wall-clock on a shared machine: compare the ratios (measured alternately in one "
        "process), not absolute times across runs.",
        "",
    ]
    C.save(RESULTS, C.header("Coupling overhead per training step", notes, load_start) + rows, not args.no_save)


if __name__ == "__main__":
    main()
