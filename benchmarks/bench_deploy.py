"""Size on disk of a clustered model in each deployment format.

For each model, its weights are clustered post-training by optimal 1-D k-means (every
conv / linear weight of the CIFAR ResNet-20 and of torchvision's ResNet-18, every
``nn.Linear`` of the character GPT; embeddings, biases and batch norm stay dense), then
written as:

* ``fp32 state_dict``: ``torch.save(model.state_dict())`` of the clustered model (the
  weights as 4-byte floats, what training leaves);
* ``safetensors packed``: ``sq_lightning.save_compressed(coding="packed")``: codebooks +
  ``ceil(log2 K)``-bit indices;
* ``Core ML fp16``: ``deploy.export_coreml(palettize=False)``, the plain conversion (every
  weight an fp16 constant), the reference of a Core ML deployment;
* ``Core ML palettized``: ``deploy.export_coreml()`` (fp16 LUTs of the layer's K
  centroids, iOS16 LUT sizes);
* ``ONNX uint8`` / ``ONNX uint4``: ``deploy.export_onnx(index_dtype=...)``, float32
  codebook + uint8 (or 4-bit, opset 21) indices rebuilt by ``Gather``;
* ``ONNX fp32``: ``torch.onnx.export`` of the same model, unmodified (reference).

An ``.mlpackage`` is a directory: its size is the sum of its files. Every Core ML and
ONNX file is checked with ``deploy.verify_coreml`` / ``deploy.verify_onnx`` (LUT /
codebook values, reconstructed weights, onnxruntime against torch on one batch of
random inputs / tokens) before its size is reported.

Usage::

    python benchmarks/bench_deploy.py [--models resnet20,resnet18,gpt] [--no-save]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import _common as C
from sq_lightning import deploy
from sq_lightning.export import save_compressed
from sq_lightning.models import ImageClassifier
from sq_lightning.ops.baselines import quantize

RESULTS = C.RESULTS_DIR / "export.md"
ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "experiments" / "checkpoints" / "resnet20_cifar10_fp.ckpt"
GPT = ROOT / "experiments" / "checkpoints" / "shakespeare_gpt_fp.ckpt"


def _kmeans(net: nn.Module, k: int, select) -> dict:
    clusters = {}
    for name, p in net.named_parameters():
        if select(name, p):
            q = quantize(p.detach(), k, "kmeans")
            with torch.no_grad():
                p.copy_(q.values)
            clusters[name] = (q.centroids, q.assignments)
    return clusters


def resnet20(k: int):
    net = ImageClassifier(arch="resnet20", init_from=str(RESNET20)).model.eval()
    return net, _kmeans(net, k, lambda n, p: p.dim() > 1), torch.randn(4, 3, 32, 32)


def resnet18(k: int):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()  # random init: sizes do not depend on training
    return net, _kmeans(net, k, lambda n, p: p.dim() > 1), torch.randn(2, 3, 224, 224)


def gpt(k: int):
    ckpt = torch.load(GPT, map_location="cpu", weights_only=True)
    lm = deploy._build_module(str(GPT), None, ckpt["hyper_parameters"])
    lm.load_state_dict(ckpt["state_dict"])
    net = lm.model.eval()
    linear = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    return net, _kmeans(net, k, lambda n, p: n in linear), torch.randint(0, 65, (2, net.block_size))


CASES = {
    "resnet20": [("ResNet-20 (CIFAR), k-means K=4", lambda: resnet20(4)),
                 ("ResNet-20 (CIFAR), k-means K=16", lambda: resnet20(16))],
    "resnet18": [("ResNet-18 (torchvision), k-means K=4", lambda: resnet18(4)),
                 ("ResNet-18 (torchvision), k-means K=16", lambda: resnet18(16))],
    "gpt": [("char GPT (Tiny Shakespeare), Linear k-means K=16", lambda: gpt(16))],
}


def measure(label: str, net: nn.Module, clusters: dict, batch: torch.Tensor, tmp: Path) -> tuple[str, list[str]]:
    sizes, notes = {}, []
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    sizes["fp32"] = len(buf.getvalue())
    sizes["packed"] = save_compressed(net, tmp / "m.safetensors", clusters, overwrite=True).file_bytes
    cm = deploy.load_clustered(net, clusters=clusters, example_input=batch[:1])
    start = time.perf_counter()
    plain = deploy.export_coreml(net, tmp / "plain.mlpackage", clusters=clusters, example_input=batch[:1],
                                 palettize=False, overwrite=True)
    sizes["coreml fp16"] = plain.bytes
    lut = deploy.export_coreml(net, tmp / "lut.mlpackage", clusters=clusters, example_input=batch[:1], overwrite=True)
    coreml_s = time.perf_counter() - start
    check = deploy.verify_coreml(lut.path, cm)
    sizes["coreml lut"] = lut.bytes
    notes.append(f"Core ML {lut.note}, {len(check.layers)} LUTs verified ({check.lut_dtype})")
    for dtype in ("uint8", "uint4"):
        rep = deploy.export_onnx(net, tmp / f"{dtype}.onnx", clusters=clusters, example_input=batch[:1],
                                 index_dtype=dtype, overwrite=True)
        check = deploy.verify_onnx(rep.path, cm, inputs=batch)
        sizes[f"onnx {dtype}"] = rep.bytes
        notes.append(f"ONNX {dtype}: max |ort - torch| {check.max_abs_diff:.1e}")
    cm_plain = deploy._torch_to_onnx(__import__("onnx"), cm, 17)
    sizes["onnx fp32"] = len(cm_plain.SerializeToString())
    n = sum(a.numel() for _, a in clusters.values())
    bits = sum(a.numel() * max(1, (c.numel() - 1).bit_length()) for c, a in clusters.values()) / n
    row = (f"| {label} | {n:,} | {bits:.1f} | " + " | ".join(f"{sizes[k]:,}" for k in
           ("fp32", "packed", "coreml fp16", "coreml lut", "onnx fp32", "onnx uint8", "onnx uint4"))
           + f" | {sizes['fp32'] / sizes['coreml lut']:.1f}x / {sizes['coreml fp16'] / sizes['coreml lut']:.1f}x"
           + f" | {sizes['fp32'] / sizes['onnx uint8']:.1f}x / {sizes['fp32'] / sizes['onnx uint4']:.1f}x |")
    print(row, "\n   ", "; ".join(notes), f"(Core ML conversions {coreml_s:.1f} s)", flush=True)
    return row, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet18,gpt", help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    load = C.uptime()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as d:
        for key in args.models.split(","):
            for label, make in CASES[key]:
                net, clusters, batch = make()
                row, note = measure(label, net, clusters, batch, Path(d))
                rows.append(row)
                notes.append(f"- {label}: " + "; ".join(note) + ".")
                C.free_memory()
    import coremltools
    import onnx
    import onnxruntime

    lines = C.header(
        "Deployment formats: Core ML palettized and ONNX codebook + indices",
        [
            f"coremltools {coremltools.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}. "
            "Bytes on disk (an .mlpackage: the sum of its files). Weights clustered post-training by k-means "
            "(ResNets: every conv and linear weight; GPT: every nn.Linear, embeddings dense); 'bits' is "
            "ceil(log2 K) per clustered weight. fp32 state_dict: torch.save of the clustered model; "
            "safetensors packed: sq_lightning.save_compressed; Core ML fp16: the plain ML program conversion; "
            "Core ML LUT: fp16 lookup tables of the K centroids (iOS16 target); ONNX fp32: torch.onnx.export "
            "unmodified; ONNX uint8 / uint4: float32 codebook + uint8 / 4-bit (opset 21) indices, Cast + Gather. "
            "Ratios: fp32 / Core ML LUT and Core ML fp16 / Core ML LUT; fp32 / ONNX uint8 and fp32 / ONNX uint4. "
            "Every Core ML / ONNX file was checked by verify_coreml / verify_onnx before it was measured.",
            "",
            "| model | clustered weights | bits | fp32 state_dict | safetensors packed | Core ML fp16 | Core ML LUT | "
            "ONNX fp32 | ONNX uint8 | ONNX uint4 | fp32 / LUT, fp16 / LUT | fp32 / ONNX u8, u4 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            *notes,
        ],
        load,
    )
    print("\n".join(lines))
    C.save(RESULTS, lines, not args.no_save)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
