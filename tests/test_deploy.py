"""Deployment formats: Core ML palettized package and ONNX codebook + indices, each checked in its own tools.

The clustered model is the committed full-precision ResNet-20 with its convolutions snapped by
k-means to K in {2, 3, 4, 16, 6} clusters (cycled over the layers: non-powers of two included),
its classifier left dense. Core ML files are read back (spec + weight blobs: prediction needs
macOS); ONNX files run in onnxruntime on real CIFAR-10 test images when the offline archive
is found.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from sq_lightning.config import SnapConfig
from sq_lightning import deploy  # noqa: E402
from sq_lightning.cli import main  # noqa: E402
from sq_lightning.export import save_compressed  # noqa: E402
from sq_lightning.models import CharGPT, ImageClassifier, resnet20  # noqa: E402
from sq_lightning.ops.baselines import quantize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = REPO / "experiments" / "checkpoints" / "resnet20_cifar10_fp.ckpt"
KS = (2, 3, 4, 16, 6)


def _snap(net: torch.nn.Module, ks=KS, skip=("fc.weight",)) -> dict:
    """k-means snaps every conv weight in place, K cycling over ``ks``; returns the clusters."""
    clusters = {}
    convs = [(n, p) for n, p in net.named_parameters() if p.dim() > 1 and n not in skip]
    for i, (name, p) in enumerate(convs):
        q = quantize(p.detach(), ks[i % len(ks)], "kmeans")
        with torch.no_grad():
            p.copy_(q.values)
        clusters[name] = (q.centroids, q.assignments)
    return clusters


@pytest.fixture(scope="module")
def clustered():
    torch.manual_seed(0)
    net = ImageClassifier(arch="resnet20", init_from=str(PRETRAINED)).model.eval()
    return net, _snap(net)


@pytest.fixture(scope="module")
def cifar_images():
    """500 normalized CIFAR-10 test images (50 per class) and labels, or None without the archive."""
    from sq_lightning.data.cifar10 import CIFAR10DataModule, load_archive, normalize

    dm = CIFAR10DataModule()
    try:
        kind, where = dm.resolve_source()
    except FileNotFoundError:
        return None
    if kind != "archive":
        return None
    arrays = load_archive(where, dm.cache_dir)
    pick = np.arange(0, len(arrays["test_x"]), len(arrays["test_x"]) // 500)[:500]
    return normalize(torch.from_numpy(arrays["test_x"][pick])), torch.from_numpy(arrays["test_y"][pick])


@pytest.fixture(scope="module")
def coreml_fp16(clustered, tmp_path_factory):
    net, clusters = clustered
    path = tmp_path_factory.mktemp("coreml") / "r20.mlpackage"
    return deploy.export_coreml(net, path, clusters=clusters), path


def _lut_ops(path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    prog = milproto.load(spec, spec.specificationVersion, str(Path(path) / "Data" / "com.apple.CoreML" / "weights"))
    ops = list(prog.functions["main"].operations)
    return spec, ops


def test_coreml_fp16_package_holds_one_lut_of_k_centroids_per_clustered_layer(clustered, coreml_fp16):
    net, clusters = clustered
    report, path = coreml_fp16
    assert path.is_dir() and report.bytes == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    check = deploy.verify_coreml(path, net, clusters=clusters)
    assert set(check.layers) == set(clusters) and check.lut_dtype == "float16" and check.plain == ["fc.weight"]
    # Read independently of verify_coreml: the spec's ops and the weight blobs.
    spec, ops = _lut_ops(path)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == len(clusters)
    params = dict(net.named_parameters())
    for name, (centroids, _) in clusters.items():
        k = centroids.numel()
        want = params[name].detach().numpy().astype(np.float16)
        [op] = [op for op in luts if op.outputs[0].shape == want.shape
                and np.array_equal(op.materialized_val_inference(), want)]
        lut = op.lut.val.reshape(-1)
        assert lut.dtype == np.float16 and lut.size == {2: 2, 3: 4, 4: 4, 6: 16, 16: 16}[k], name  # iOS16 sizes
        assert np.array_equal(np.unique(lut), np.unique(centroids.numpy().astype(np.float16))), name
        assert np.abs(lut.astype(np.float64)[:k] - centroids.double().numpy()).max() <= 2.0**-11 * centroids.abs().max().item()
    # The classifier is not clustered: a dense fp16 constant of exactly its weights.
    fc = params["fc.weight"].detach().numpy().astype(np.float16)
    assert any(op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
               and op.outputs[0].val.shape == fc.shape and np.array_equal(op.outputs[0].val, fc) for op in ops)
    assert any(op.op_type == "batch_norm" for op in ops)  # kept, not folded into the clustered weights


def test_coreml_fp32_is_bit_exact_and_ios18_uses_3_bit_luts(clustered, tmp_path):
    net, clusters = clustered
    report = deploy.export_coreml(net, tmp_path / "r20.mlpackage", clusters=clusters, precision="fp32", target="iOS18")
    check = deploy.verify_coreml(report.path, net, clusters=clusters)
    assert check.lut_dtype == "float32"
    assert all(layer.max_centroid_error == 0.0 for layer in check.layers.values())
    six = [n for n, (c, _) in clusters.items() if c.numel() == 6]
    assert six and all(report.layers[n].entries == 8 and report.layers[n].index_bits == 3 for n in six)
    assert all(check.layers[n].distinct == 6 and check.layers[n].entries == 8 for n in six)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        deploy.export_coreml(net, tmp_path / "r20.mlpackage", clusters=clusters)


def test_verify_coreml_rejects_a_package_that_is_not_the_model(clustered, coreml_fp16):
    net, clusters = clustered
    _, path = coreml_fp16
    other = copy.deepcopy(net)
    name = "layer2.0.conv1.weight"
    centroids, assignments = clusters[name]
    moved = centroids + 0.01
    with torch.no_grad():
        dict(other.named_parameters())[name].copy_(moved[assignments])
    with pytest.raises(deploy.DeployVerificationError, match="reconstructs no clustered torch weight"):
        deploy.verify_coreml(path, other, clusters={**clusters, name: (moved, assignments)})


def test_onnx_stores_codebook_and_uint8_indices_and_runs_like_torch_on_cifar10(clustered, cifar_images, tmp_path):
    net, clusters = clustered
    report = deploy.export_onnx(net, tmp_path / "r20.onnx", clusters=clusters)
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {out: node for node in proto.graph.node for out in node.output}
    params = dict(net.named_parameters())
    for name, (centroids, assignments) in clusters.items():
        gather = nodes[name]  # the weight's own name is now the Gather's output
        assert gather.op_type == "Gather"
        codebook = inits[gather.input[0]]
        cast = nodes[gather.input[1]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT32
        indices = inits[cast.input[0]]
        assert codebook.data_type == onnx.TensorProto.FLOAT and list(codebook.dims) == [centroids.numel()]
        assert indices.data_type == onnx.TensorProto.UINT8 and list(indices.dims) == list(params[name].shape)
        rebuilt = numpy_helper.to_array(codebook)[numpy_helper.to_array(indices).astype(np.int64)]
        assert np.array_equal(rebuilt, params[name].detach().numpy()), name
    assert "fc.weight" in inits and inits["fc.weight"].data_type == onnx.TensorProto.FLOAT
    fp32_bytes = sum(p.numel() * 4 for p in net.state_dict().values())
    assert report.bytes < fp32_bytes / 2.5  # 1 byte per clustered weight instead of 4

    if cifar_images is None:
        check = deploy.verify_onnx(report.path, net, clusters=clusters, inputs=torch.randn(8, 3, 32, 32))
        pytest.skip("offline CIFAR-10 archive not found: onnxruntime checked on random inputs only")
    images, labels = cifar_images
    check = deploy.verify_onnx(report.path, net, clusters=clusters, inputs=images)
    assert check.inputs == 500 and check.agree == 1.0 and check.max_abs_diff < 1e-3
    import onnxruntime as ort

    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        want = net(images).numpy()
    assert np.array_equal(logits.argmax(1), want.argmax(1))
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    # Same accuracy, then (k-means at 2-16 values without refinement costs the ResNet most of it).
    assert (logits.argmax(1) == labels.numpy()).mean() == (want.argmax(1) == labels.numpy()).mean()


def test_onnx_uint4_indices_halve_the_index_bytes(clustered, tmp_path):
    net, clusters = clustered
    u8 = deploy.export_onnx(net, tmp_path / "u8.onnx", clusters=clusters)
    u4 = deploy.export_onnx(net, tmp_path / "u4.onnx", clusters=clusters, index_dtype="uint4")
    assert all(layer.index_bits == 4 for layer in u4.layers.values())  # every K <= 16
    n = sum(a.numel() for _, a in clusters.values())
    assert u8.bytes - u4.bytes >= 0.45 * n
    proto = onnx.load(u4.path)
    assert any(o.version == 21 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    check = deploy.verify_onnx(u4.path, net, clusters=clusters, inputs=torch.randn(4, 3, 32, 32))
    assert check.agree == 1.0


def test_verify_onnx_rejects_a_file_that_is_not_the_model(clustered, tmp_path):
    net, clusters = clustered
    report = deploy.export_onnx(net, tmp_path / "r20.onnx", clusters=clusters)
    proto = onnx.load(report.path)
    name = "layer1.1.conv1.weight"
    gather = next(node for node in proto.graph.node if node.output[0] == name)
    init = next(i for i in proto.graph.initializer if i.name == gather.input[0])
    codebook = numpy_helper.to_array(init).copy()
    codebook[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(codebook, init.name))
    onnx.save(proto, tmp_path / "bad.onnx")
    with pytest.raises(deploy.DeployVerificationError, match="rebuilds no clustered torch weight"):
        deploy.verify_onnx(tmp_path / "bad.onnx", net, clusters=clusters)


def test_a_module_without_clustered_layers_is_refused(tmp_path):
    with pytest.raises(deploy.NoClusteredLayersError, match="no clustered \\(snapped\\) layer"):
        deploy.export_onnx(resnet20().eval(), tmp_path / "plain.onnx")
    assert not (tmp_path / "plain.onnx").exists()
    with pytest.raises(ValueError, match="`precision` must be one of"):
        deploy.export_coreml(resnet20(), tmp_path / "x.mlpackage", precision="int8")
    with pytest.raises(ValueError, match="must end with '.onnx'"):
        deploy.export_onnx(resnet20(), tmp_path / "x.pb")


def test_clusters_are_found_in_a_live_module_and_in_a_compressed_file(clustered, tmp_path):
    net, clusters = clustered
    found = deploy.find_clusters(net)
    assert set(found) == set(clusters)  # fc.weight has 640 distinct values: not clustered
    assert all(found[n][0].numel() == clusters[n][0].numel() for n in clusters)
    save_compressed(net, tmp_path / "r20.safetensors", clusters)
    target = resnet20()
    cm = deploy.load_clustered(tmp_path / "r20.safetensors", model=target)
    assert set(cm.clusters) == set(clusters)
    for name, (codebook, indices) in cm.clusters.items():
        assert torch.equal(codebook, clusters[name][0]) and torch.equal(codebook[indices], dict(net.named_parameters())[name])
    with pytest.raises(ValueError, match="pass `model=`"):
        deploy.load_clustered(tmp_path / "r20.safetensors")


def _checkpoint(path: Path, snapped: bool = True) -> dict:
    """A Lightning checkpoint as a Trainer with ClusterRefine writes it after the snap (its
    ``state_dict``, hyperparameters and the ``ClusterRefine`` snapper state)."""
    torch.manual_seed(0)
    lm = ImageClassifier(arch="resnet20")
    clusters = _snap(lm.model, ks=(2, 3))
    ckpt = {"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "pytorch-lightning_version": "2.6.6"}
    if snapped:
        ckpt["callbacks"] = {"ClusterRefine": {"snapper": {"exact": True, "clusters": {
            f"model.{n}": {"centroids": c, "assignments": a.to(torch.uint8), "counts": torch.bincount(a.reshape(-1))}
            for n, (c, a) in clusters.items()}}}}
    torch.save(ckpt, path)
    return clusters


def test_cli_exports_a_checkpoint_to_onnx_and_coreml(tmp_path, capsys):
    clusters = _checkpoint(tmp_path / "snapped.ckpt")
    main(["export", str(tmp_path / "snapped.ckpt"), str(tmp_path / "m.onnx"), "--format", "onnx"])
    out = capsys.readouterr().out
    assert "verified: 19 codebook + indices weights" in out and "1 dense: fc.weight" in out
    main(["export", str(tmp_path / "snapped.ckpt"), str(tmp_path / "m.mlpackage"), "--format", "coreml"])
    out = capsys.readouterr().out
    assert "verified: 19 lookup tables (float16)" in out
    check = deploy.verify_coreml(tmp_path / "m.mlpackage", tmp_path / "snapped.ckpt")
    assert {n: c.k for n, c in check.layers.items()} == {n: c.numel() for n, (c, _) in clusters.items()}
    # The default format is still the safetensors file.
    main(["export", str(tmp_path / "snapped.ckpt"), str(tmp_path / "m.safetensors")])
    assert "bits per quantized weight" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "snapped.ckpt"), str(tmp_path / "m.onnx"), "--format", "onnx"])
    assert exit_info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_without_snapped_layers(tmp_path, capsys):
    _checkpoint(tmp_path / "plain.ckpt", snapped=False)
    for fmt, out in (("onnx", "m.onnx"), ("coreml", "m.mlpackage")):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tmp_path / "plain.ckpt"), str(tmp_path / out), "--format", fmt])
        assert exit_info.value.code == 2
        assert "no clustered (snapped) layer" in capsys.readouterr().err
        assert not (tmp_path / out).exists()


@pytest.mark.parametrize("missing, fmt, out", [("coremltools", "coreml", "m.mlpackage"), ("onnx", "onnx", "m.onnx"),
                                               ("onnxruntime", "onnx", "m.onnx")])
def test_missing_optional_dependency_says_how_to_install_it(missing, fmt, out, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "any.ckpt"), str(tmp_path / out), "--format", fmt])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`{missing}`" in err and "pip install 'sq_lightning[deploy]'" in err
    if missing != "onnxruntime":
        net = resnet20().eval()
        clusters = _snap(net, ks=(2,))
        export = deploy.export_coreml if fmt == "coreml" else deploy.export_onnx
        with pytest.raises(ImportError, match=r"pip install 'sq_lightning\[deploy\]'"):
            export(net, tmp_path / out, clusters=clusters)


def test_char_gpt_to_onnx_matches_torch(tmp_path):
    torch.manual_seed(0)
    gpt = CharGPT(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    clusters = {}
    for name, p in gpt.named_parameters():
        if p.dim() == 2 and "emb" not in name:
            q = quantize(p.detach(), 16, "kmeans")
            with torch.no_grad():
                p.copy_(q.values)
            clusters[name] = (q.centroids, q.assignments)
    report = deploy.export_onnx(gpt, tmp_path / "gpt.onnx", clusters=clusters)
    assert set(report.layers) == set(clusters) and set(report.plain) == {"tok_emb.weight", "pos_emb.weight"}
    tokens = torch.randint(0, 65, (3, 20))  # another batch size and sequence length than traced
    check = deploy.verify_onnx(report.path, gpt, clusters=clusters, inputs=tokens)
    assert check.agree == 1.0 and any(layer.transposed for layer in check.layers.values())  # MatMul takes W^T


def test_char_gpt_to_coreml(tmp_path):
    """coremltools 9.0's TorchScript frontend fails on the trace of the attention under torch 2.14
    (`aten::Int` of a shape tensor); the export falls back to torch.export, which converts."""
    torch.manual_seed(0)
    gpt = CharGPT(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    clusters = {}
    for name, p in gpt.named_parameters():
        if p.dim() == 2 and "emb" not in name:
            q = quantize(p.detach(), 4, "kmeans")
            with torch.no_grad():
                p.copy_(q.values)
            clusters[name] = (q.centroids, q.assignments)
    report = deploy.export_coreml(gpt, tmp_path / "gpt.mlpackage", clusters=clusters)
    check = deploy.verify_coreml(report.path, gpt, clusters=clusters)
    assert set(check.layers) == set(clusters) and set(check.plain) == {"tok_emb.weight", "pos_emb.weight"}
    assert all(layer.entries == 4 for layer in check.layers.values())
    assert report.note in ("traced with torch.jit.trace", "traced with torch.export")


@pytest.mark.slow
def test_cli_exports_a_real_cluster_refine_checkpoint(tmp_path):
    """A real soft-quantization + ClusterRefine run on the digits, its last checkpoint exported
    by `python -m sq_lightning export --format coreml|onnx`."""
    import subprocess

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sq_lightning import ClusterRefine, SoftQuantCallback
    from tests.helpers import digits_loaders, trainer

    pl.seed_everything(0)
    train, val = digits_loaders()
    model = ImageClassifier(arch="mlp", in_features=64, mlp_hidden=[64, 32], lr=0.05)
    every = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    callbacks = [SoftQuantCallback(h=2e-3, w=0.45, start_epoch=1, stop_epoch=4),
                 ClusterRefine(snap_epoch=4, w=0.45, snap=SnapConfig(on_unclustered="snap")), every]
    trainer(max_epochs=6, callbacks=callbacks, enable_checkpointing=True).fit(model, train, val)
    ckpt = tmp_path / "ck" / "epoch=5.ckpt"
    for fmt, out in (("onnx", "m.onnx"), ("coreml", "m.mlpackage")):
        done = subprocess.run([sys.executable, "-m", "sq_lightning", "export", str(ckpt), str(tmp_path / out),
                               "--format", fmt], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "verified:" in done.stdout
