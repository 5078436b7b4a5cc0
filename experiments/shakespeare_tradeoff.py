"""Character GPT on Tiny Shakespeare: validation loss against weighted bits, every method on
the same terms.

Protocol (fixed before any row was run):

- start: the committed full-precision checkpoint (``experiments/checkpoints/shakespeare_gpt_fp.ckpt``);
- quantized: the 16 attention and MLP ``Linear`` weights of the 4 blocks; embeddings and the
  output head stay float32. ``bits`` is the parameter-weighted ``log2 K_l`` over the quantized
  weights; ``bits_all`` counts every parameter, float32 ones as 32 bits;
- every training-time method fine-tunes for the same ``--couple-steps`` + ``--refine-steps``
  optimizer steps with AdamW (lr 3e-4 constant, no weight decay, gradient clip 1.0), batch 32 x
  128 characters, training blocks drawn from the run's seed;
- ``softquant``: the package's recipe (``configs/shakespeare_gpt_softquant.yaml`` then
  ``_refine.yaml``: ``SoftQuantCallback(h, w)`` for the coupling steps, then ``ClusterRefine``
  snaps and refines with tied weights);
- ``kmeans-refine``: each layer snapped at the first step to optimal 1-D k-means of the
  checkpoint's weights at the ``K_l`` of a ``softquant`` row (``--k-from``), then refined with
  tied weights for all the steps (the fair control: same steps, clusters without training);
- ``codebook`` (method B): ``LearnedCodebook(lam=30, bits)`` for the coupling steps, then
  ``ClusterRefine(clusters_from="codebook")`` snaps to the learned values and refines;
- ``fp-continued``: the same steps without quantization (what the extra training alone gives);
- ``ptq``: no training, at the ``K_l`` of a ``softquant`` row: HEQ and k-means; and
  round-to-nearest per output channel (``rtn``) at 2, 3 and 4 bits, its scales counted in
  ``bits`` (two 16-bit numbers per output channel).

Validation loss is the mean cross-entropy in nats per character over the whole held-out 10%.
Rows are appended to ``experiments/results/shakespeare_tradeoff.jsonl``; ``--report`` writes
``shakespeare_tradeoff.md`` and the plot from them.

    python experiments/shakespeare_tradeoff.py --method softquant --w 0.3 --seed 0
    python experiments/shakespeare_tradeoff.py --method ptq --k-from softquant:w=0.3:seed=0
    python experiments/shakespeare_tradeoff.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "experiments" / "checkpoints" / "shakespeare_gpt_fp.ckpt"
RESULTS = REPO / "experiments" / "results"
ROWS = RESULTS / "shakespeare_tradeoff.jsonl"
ARCH = dict(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=192)
EXCLUDE = ["^model\\.head\\."]
STEPS_PER_EPOCH = 250


def _data(seed: int):
    from sq_lightning.data import ShakespeareDataModule

    return ShakespeareDataModule(block_size=128, batch_size=32, batches_per_epoch=STEPS_PER_EPOCH, seed=seed)


def _model():
    from sq_lightning.models import CharLanguageModel

    return CharLanguageModel(**ARCH, lr=3e-4, weight_decay=0.0, warmup_steps=0, schedule="constant",
                             init_from=str(CHECKPOINT))


def _quantized_names(model) -> list[str]:
    from sq_lightning.layers import LayerSelector

    return [n for n, _ in LayerSelector(exclude=EXCLUDE).select(model)]


@torch.no_grad()
def val_loss(model, dm) -> float:
    """Mean cross-entropy (nats per character) over every validation block."""
    model.eval()
    total, count = 0.0, 0
    for x, y in dm.val_dataloader():
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def _bits(model, ks: dict[str, float]) -> tuple[float, float]:
    """(weighted bits over the quantized layers, weighted bits over every parameter)."""
    params = dict(model.named_parameters())
    n_q = sum(params[n].numel() for n in ks)
    bits_q = sum(params[n].numel() * b for n, b in ks.items()) / n_q
    n_all = sum(p.numel() for p in params.values())
    bits_all = (bits_q * n_q + 32 * (n_all - n_q)) / n_all
    return bits_q, bits_all


def _trainer(epochs: int, callbacks) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks)


def _strength(text: str) -> float | None:
    return None if text == "relative" else float(text)


def run_training(method: str, seed: int, couple_steps: int, refine_steps: int, h: float | None, w: float,
                 k_from: dict | None, bits: int = 3, grad_ratio: float | None = None) -> dict:
    from sq_lightning import ClusterRefine, LearnedCodebook, SnapConfig, SoftQuantCallback
    from sq_lightning.ops.baselines import kmeans_quantize
    from sq_lightning.ops.clustering import Clusters

    if couple_steps % STEPS_PER_EPOCH or refine_steps % STEPS_PER_EPOCH:
        raise SystemExit(f"--couple-steps and --refine-steps must be multiples of {STEPS_PER_EPOCH}")
    pl.seed_everything(seed)
    dm, model = _data(seed + 100), _model()
    c_ep, r_ep = couple_steps // STEPS_PER_EPOCH, refine_steps // STEPS_PER_EPOCH
    callbacks, refine = [], None
    if method == "softquant":
        extra = {} if grad_ratio is None else {"grad_ratio": grad_ratio}
        callbacks = [SoftQuantCallback(h=h, w=w, exclude=EXCLUDE, stop_epoch=c_ep, histogram_every_n_epochs=0, **extra),
                     ClusterRefine(snap_epoch=c_ep, w=w, exclude=EXCLUDE, snap=SnapConfig(recalibrate_bn_batches=0))]
    elif method == "kmeans-refine":
        params = dict(model.named_parameters())
        clusters = {n: Clusters.from_quantization(kmeans_quantize(params[n].detach(), int(k)))
                    for n, k in k_from["k"].items()}
        refine = ClusterRefine(snap_epoch=0, w=w, exclude=EXCLUDE, snap=SnapConfig(recalibrate_bn_batches=0, on_unclustered="snap")).snap_to(clusters)
        callbacks = [refine]
    elif method == "codebook":
        callbacks = [LearnedCodebook(lam=30.0, bits=bits, init="kmeans", exclude=EXCLUDE, stop_epoch=c_ep),
                     ClusterRefine(snap_epoch=c_ep, clusters_from="codebook", exclude=EXCLUDE, snap=SnapConfig(recalibrate_bn_batches=0))]
    elif method != "fp-continued":
        raise SystemExit(f"unknown training method {method!r}")
    start = time.perf_counter()
    trainer = _trainer(c_ep + r_ep, callbacks)
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    row = {"method": method, "seed": seed, "couple_steps": couple_steps, "refine_steps": refine_steps,
           "val_loss": val_loss(model, dm), "seconds": round(seconds, 1)}
    if method == "softquant":
        row.update(h=h if h is not None else "relative", w=w)
        if h is None:
            row["grad_ratio"] = callbacks[0].grad_ratio
    if method == "codebook":
        row.update(codebook_bits=bits, lam=30.0)
    if callbacks:
        snapper = callbacks[-1].snapper
        names = _quantized_names(model)
        done = {n: r for n, r in snapper.reports.items() if r.snapped}
        row["k"] = {n: r.k for n, r in done.items()}  # layers kept float32 are not in it
        row["clustered"], row["layers"] = len(done), len(names)
        ks = {n: (math.log2(done[n].k) if done[n].k > 1 else 0.0) if n in done else 32.0 for n in names}
        row["bits"], row["bits_all"] = _bits(model, ks)
        row["entropy"] = snapper.summary().get("entropy_weighted")
    if k_from is not None:
        row["k_from"] = k_from["label"]
    return row


def run_ptq(k_from: dict) -> list[dict]:
    from sq_lightning.ops.baselines import quantize, rtn_bits_per_weight, rtn_per_channel

    dm = _data(0)
    rows = []
    base = _model()
    names = _quantized_names(base)
    have = {(r["method"], r.get("rtn_bits")) for r in _rows()}  # rows that do not depend on --k-from: once
    if ("fp", None) not in have:
        rows.append({"method": "fp", "seed": 0, "val_loss": val_loss(base, dm), "bits": 32.0, "bits_all": 32.0})
    for quantizer in ("heq", "kmeans"):
        model = _model()
        params = dict(model.named_parameters())
        ks = {}
        with torch.no_grad():
            for n in names:
                if n not in k_from["k"]:
                    ks[n] = 32.0  # kept float32 by the row the K_l come from
                    continue
                k = int(k_from["k"][n])
                params[n].copy_(quantize(params[n], k, quantizer).values)
                ks[n] = math.log2(k) if k > 1 else 0.0
        bits, bits_all = _bits(model, ks)
        rows.append({"method": f"ptq-{quantizer}", "seed": 0, "val_loss": val_loss(model, dm), "bits": bits,
                     "bits_all": bits_all, "k_from": k_from["label"], "k": k_from["k"]})
    for b in (2, 3, 4):
        if ("ptq-rtn", b) in have:
            continue
        model = _model()
        params = dict(model.named_parameters())
        ks = {}
        with torch.no_grad():
            for n in names:
                params[n].copy_(rtn_per_channel(params[n], b))
                ks[n] = rtn_bits_per_weight(tuple(params[n].shape), b)
        bits, bits_all = _bits(model, ks)
        rows.append({"method": "ptq-rtn", "seed": 0, "rtn_bits": b, "val_loss": val_loss(model, dm), "bits": bits,
                     "bits_all": bits_all})
    return rows


def _find_k(spec: str) -> dict:
    """The K_l of the row ``method:key=value:...`` (the last such row)."""
    method, *pairs = spec.split(":")
    want = dict(p.split("=", 1) for p in pairs)
    for row in reversed(_rows()):
        if row["method"] == method and all(str(row.get(k)) == v for k, v in want.items()) and "k" in row:
            return {"k": row["k"], "label": spec}
    raise SystemExit(f"--k-from {spec!r}: no such row with per-layer K_l in {ROWS}")


def _rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []


def _append(row: dict, argv: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    row.update(command="python experiments/shakespeare_tradeoff.py " + " ".join(argv), torch=torch.__version__,
               threads=torch.get_num_threads(), machine=f"{platform.machine()}, {platform.processor() or 'cpu'}",
               date=time.strftime("%Y-%m-%d"))
    with ROWS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "k"}))


def _unique(rows: list[dict]) -> list[dict]:
    """Rows without repeats of the same measurement (the same method, setting and result)."""
    seen, out = set(), []
    for r in rows:
        key = (r["method"], r.get("rtn_bits"), r.get("k_from"), r.get("w"), r.get("seed"), r["val_loss"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def report() -> str:
    rows = sorted(_unique(_rows()), key=lambda r: (-r.get("bits", 32.0), r["method"]))
    fp = next((r["val_loss"] for r in rows if r["method"] == "fp"), float("nan"))
    lines = [
        "# Character GPT / Tiny Shakespeare: validation loss against weighted bits",
        "",
        "Generated by `python experiments/shakespeare_tradeoff.py --report` from "
        "`experiments/results/shakespeare_tradeoff.jsonl`; the protocol is the docstring of the script.",
        f"Full-precision checkpoint: validation loss {fp:.4f} nats per character "
        f"({fp / math.log(2):.4f} bits per character).",
        "",
        "| method | seed | steps (couple + refine) | setting | layers clustered | bits (quantized) | bits (all) "
        "| val loss | vs FP | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        steps = f"{r['couple_steps']} + {r['refine_steps']}" if "couple_steps" in r else "-"
        setting = (f"h={r.get('h')}{', ratio ' + str(r['grad_ratio']) if 'grad_ratio' in r else ''}, w={r.get('w')}"
                   if r["method"] == "softquant"
                   else f"{r['rtn_bits']} bits per channel" if r["method"] == "ptq-rtn"
                   else f"K={2 ** r['codebook_bits']}, lam={r['lam']}" if r["method"] == "codebook"
                   else f"K_l of {r['k_from']}" if "k_from" in r else "-")
        clustered = f"{r['clustered']}/{r['layers']}" if "clustered" in r else "-"
        lines.append(
            f"| {r['method']} | {r['seed']} | {steps} | {setting} | {clustered} | {r.get('bits', 32):.3f} | "
            f"{r.get('bits_all', 32):.3f} | {r['val_loss']:.4f} | {r['val_loss'] - fp:+.4f} | {r.get('seconds', '-')} |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}` ({r['date']}, {r['machine']}, {r['threads']} "
                                      f"thread(s), torch {r['torch']})" for r in rows]
    return "\n".join(lines) + "\n"


def plot(path: Path) -> None:
    """Validation loss against weighted bits of the quantized layers, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _unique(_rows()) if r["method"] != "fp-continued"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r.get("bits", 32.0), r["val_loss"]) for r in rows if r["method"] == method and r.get("bits", 32) < 32
                     or r["method"] == method == "fp")
        if method == "fp":
            ax.axhline(pts[0][1], color="k", lw=0.8, ls="--", label="full precision")
            continue
        ax.plot(*zip(*pts), "o-" if method.startswith("ptq") else "s", label=method)
    for r in _rows():
        if r["method"] == "fp-continued":
            ax.axhline(r["val_loss"], color="gray", lw=0.8, ls=":", label="fp, same extra steps")
    ax.set_xlabel("weighted bits of the quantized layers")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("Character GPT, Tiny Shakespeare")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["softquant", "codebook", "kmeans-refine", "fp-continued", "ptq"])
    p.add_argument("--bits", type=int, default=3, help="codebook: K = 2^bits learned representatives per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--couple-steps", type=int, default=1000)
    p.add_argument("--refine-steps", type=int, default=500)
    p.add_argument("--h", type=_strength, default=1e-3,
                   help="softquant: a fixed h, or 'relative' for SoftQuantCallback(h=None) (default 1e-3)")
    p.add_argument("--grad-ratio", type=float, default=None, help="softquant with --h relative: its grad_ratio")
    p.add_argument("--w", type=float, default=0.3)
    p.add_argument("--k-from", help="K_l of an earlier row, 'softquant:w=0.3:seed=0' (ptq, kmeans-refine)")
    p.add_argument("--report", action="store_true")
    ns = p.parse_args(argv)
    if ns.report:
        (RESULTS / "shakespeare_tradeoff.md").write_text(report())
        plot(RESULTS / "shakespeare_tradeoff.png")
        return 0
    if not CHECKPOINT.exists():
        raise SystemExit(f"{CHECKPOINT} is missing: train it with configs/shakespeare_gpt_pretrain.yaml")
    k_from = _find_k(ns.k_from) if ns.k_from else None
    if ns.method == "ptq":
        if k_from is None:
            raise SystemExit("--method ptq needs --k-from")
        for row in run_ptq(k_from):
            _append(row, argv)
    else:
        if ns.method == "kmeans-refine" and k_from is None:
            raise SystemExit("--method kmeans-refine needs --k-from")
        _append(run_training(ns.method, ns.seed, ns.couple_steps, ns.refine_steps, ns.h, ns.w, k_from, ns.bits,
                             ns.grad_ratio), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
