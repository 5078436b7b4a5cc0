import copy
import logging
import math
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sq_lightning.config import ExportConfig, RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine, SoftQuantCallback
from sq_lightning.export import load_compressed, save_compressed
from sq_lightning.ops.baselines import quantize
from sq_lightning.ops.clustering import Clusters
from sq_lightning.snapper import ClusterSnapper, UnclusteredLayerError
from tests.helpers import TinyNet, accuracy, digits_loaders, trainer

WEIGHTS = ("net.0.weight", "net.2.weight", "net.4.weight")
WEIGHTS_PLAIN = ("0.weight", "2.weight", "4.weight")  # TinyNet().net
BN_WEIGHTS = ("net.0.weight", "net.3.weight", "net.5.weight")  # TinyNet(bn=True)


class _StopAfter(pl.Callback):
    """Ends the fit after ``epochs`` epochs, as a run killed then would (its checkpoints are written)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _pipeline(tmp_path, epochs=22, snap_epoch=18, start_epoch=10, logger=True, extra=(), bn=False, shuffle=True,
              snap=None, refine=RefineConfig(), export=None):
    """Pretrain, couple, snap and refine in one fit: the three stages as epoch windows."""
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=shuffle)
    # Without BatchNorm by default: a layer followed by BatchNorm is scale-invariant, its
    # norm drifts under SGD, and a range frozen at coupling start drifts with it.
    model = TinyNet(bn=bn)
    soft = SoftQuantCallback(h=2e-3, w=0.45, start_epoch=start_epoch, stop_epoch=snap_epoch)
    refine = ClusterRefine(snap_epoch=snap_epoch, w=0.45, snap=SnapConfig(**{"recalibrate_bn_batches": 20, **(snap or {})}),
                           refine=refine, export=export)
    log = TensorBoardLogger(tmp_path, name="tb") if logger else False
    trainer(max_epochs=epochs, callbacks=[soft, refine, *extra], logger=log, enable_checkpointing=bool(extra)).fit(model, train, val)
    return model, refine, train, val


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    model, refine, train, val = _pipeline(tmp, export=ExportConfig("m.sq.safetensors", "ans"))
    return tmp, model, refine, train, val


def test_refined_model_holds_exactly_k_values_per_layer(pipeline):
    _, model, refine, _, _ = pipeline
    params = dict(model.named_parameters())
    assert set(refine.snapper.reports) == set(WEIGHTS)
    for name, rep in refine.snapper.reports.items():
        assert rep.snapped, (name, rep)
        assert torch.unique(params[name].detach()).numel() == rep.k
        assert 2 <= rep.k <= 16
        assert rep.snap_error < 0.3


def test_metrics_and_histograms_reach_tensorboard(pipeline):
    tmp, _, refine, _, _ = pipeline
    acc = EventAccumulator(str(tmp / "tb" / "version_0"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for name in WEIGHTS:
        for metric in ("bits", "clusters", "snap_error", "entropy"):
            assert f"sq/{metric}/{name}" in scalars
        for prefix in ("sq/weights", "sq/weights_pre_snap", "sq/weights_snapped"):
            assert f"{prefix}/{name}" in hists
    for tag in ("sq/bits_weighted", "sq/bits_mean", "sq/compression_ratio", "sq/coupling_loss", "sq/entropy_weighted"):
        assert tag in scalars
    bits = acc.Scalars("sq/bits_weighted")[-1].value
    assert bits == pytest.approx(refine.snapper.summary()["bits_weighted"], rel=1e-5)
    entropy = acc.Scalars("sq/entropy_weighted")[-1].value
    assert entropy == pytest.approx(refine.snapper.summary()["entropy_weighted"], rel=1e-5)
    k0 = acc.Scalars(f"sq/clusters/{WEIGHTS[0]}")[-1].value
    assert k0 == refine.snapper.reports[WEIGHTS[0]].k


def test_entropy_is_that_of_the_refined_weights_value_counts(pipeline):
    # Reference: scipy's entropy of how often each distinct value occurs in the refined
    # layer (counted from the weights, not from the snapper's own cluster sizes).
    _, model, refine, _, _ = pipeline
    params = dict(model.named_parameters())
    total = weighted = 0.0
    for name, rep in refine.snapper.reports.items():
        _, counts = np.unique(params[name].detach().numpy(), return_counts=True)
        ref = scipy.stats.entropy(counts, base=2)
        assert rep.entropy == pytest.approx(ref, rel=1e-9, abs=1e-12), name
        assert rep.entropy <= rep.bits + 1e-9
        total, weighted = total + counts.sum(), weighted + counts.sum() * ref
    assert refine.snapper.summary()["entropy_weighted"] == pytest.approx(weighted / total, rel=1e-9)
    assert "entropy_weighted=" in refine.snapper.table()


def test_entropy_of_a_checkpoint_without_it_is_recomputed_from_the_stored_clusters(pipeline):
    _, _, refine, _, _ = pipeline
    state = copy.deepcopy(refine.snapper.state_dict())
    for r in state["reports"].values():
        del r["entropy"]  # as written before the entropy was reported
    fresh = ClusterSnapper()
    fresh.load_state_dict(state)
    for name, rep in refine.snapper.reports.items():
        assert fresh.reports[name].entropy == pytest.approx(rep.entropy, rel=1e-12)


def test_beats_heq_of_the_full_precision_model_at_the_same_k(pipeline):
    _, model, refine, train, val = pipeline
    pl.seed_everything(0)
    fp = TinyNet()
    trainer(max_epochs=22).fit(fp, train)
    fp_acc = accuracy(fp, val)
    heq = copy.deepcopy(fp)
    params = dict(heq.named_parameters())
    with torch.no_grad():
        for name, rep in refine.snapper.reports.items():
            params[name].copy_(quantize(params[name], rep.k, "heq").values)
    heq_acc, sq_acc = accuracy(heq, val), accuracy(model, val)
    print(f"full precision {fp_acc:.4f}  soft quantization + refine {sq_acc:.4f}  HEQ at same K_l {heq_acc:.4f}")
    print(refine.snapper.table())
    assert sq_acc >= fp_acc - 0.02
    assert sq_acc > heq_acc + 0.01


def test_export_of_the_refined_model_round_trips(pipeline, tmp_path):
    _, model, refine, _, _ = pipeline
    report = save_compressed(model, tmp_path / "m.safetensors", refine.clusters())
    state = load_compressed(tmp_path / "m.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert report.compression_ratio > 1


def test_export_path_writes_the_refined_model_into_the_run_directory(pipeline):
    tmp, model, refine, _, _ = pipeline
    path = tmp / "tb" / "version_0" / "m.sq.safetensors"  # relative: inside trainer.log_dir
    assert refine.exported == str(path) and path.exists()
    state = load_compressed(path)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    # Entropy-coded: each layer's index stream is within a few words of N_l·H_l bits.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for name, rep in refine.snapper.reports.items():
            stream = f.get_tensor(name + ":ans")
            entropy_bytes = rep.numel * rep.entropy / 8
            assert entropy_bytes <= stream.numel() * 4 <= entropy_bytes * 1.01 + 16, name
    acc = EventAccumulator(str(tmp / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("sq/export_bytes")[-1].value == path.stat().st_size


def test_export_path_that_exists_is_refused_before_training(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"the user's file")
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    refine = ClusterRefine(snap_epoch=1, w=0.45, export=ExportConfig(path=str(target)))
    with pytest.raises(ValueError, match="`export.path` .*keep.safetensors' exists.*never replaces"):
        trainer(max_epochs=2, callbacks=[refine]).fit(model, train)
    assert target.read_bytes() == b"the user's file"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing trained


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"path": "m.safetensors", "coding": "zip"}, "`coding` must be one of"),
        ({"path": 3}, "`export.path` must be a file path"),
        ({"path": ""}, "`export.path` must be a file path"),
    ],
)
def test_bad_export_arguments_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A short pipeline (snap at epoch 4) that keeps a checkpoint of every epoch."""
    tmp = tmp_path_factory.mktemp("ckpts")
    every = ModelCheckpoint(dirpath=tmp / "ck", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    model, refine, _, _ = _pipeline(tmp, epochs=6, snap_epoch=4, start_epoch=1, logger=False, extra=(every,),
                                    snap=dict(on_unclustered="snap"))
    return tmp, model, refine


def test_export_checkpoint_writes_the_checkpoint_s_snapped_model(checkpoints):
    from sq_lightning.export import export_checkpoint

    tmp, model, refine = checkpoints
    report = export_checkpoint(tmp / "ck" / "epoch=5.ckpt", tmp / "last.sq.safetensors", coding="ans")
    assert set(report.layers) == set(refine.snapper.clusters) and all(r.coding == "ans" for r in report.layers.values())
    state = load_compressed(tmp / "last.sq.safetensors")
    for k, v in model.state_dict().items():  # the checkpoint of the last epoch = the trained model
        assert torch.equal(state[k], v), k
    # The same through the command line.
    cmd = [sys.executable, "-m", "sq_lightning", "export", str(tmp / "ck" / "epoch=5.ckpt"), str(tmp / "cli.safetensors")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bits per quantized weight" in done.stdout
    cli_state = load_compressed(tmp / "cli.safetensors")
    assert all(torch.equal(cli_state[k], v) for k, v in state.items())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_export_checkpoint_refuses_checkpoints_it_cannot_export_faithfully(checkpoints, tmp_path):
    from sq_lightning.export import export_checkpoint

    tmp, _, _ = checkpoints
    with pytest.raises(ValueError, match="saved before ClusterRefine snapped"):
        export_checkpoint(tmp / "ck" / "epoch=2.ckpt", tmp_path / "a.safetensors")
    ckpt = torch.load(tmp / "ck" / "epoch=5.ckpt", weights_only=True)
    name = next(iter(ckpt["callbacks"]["ClusterRefine"]["snapper"]["clusters"]))
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1e-3  # weights no longer the snapped values
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match=f"weights of '{name}' are not the snapped values"):
        export_checkpoint(tmp_path / "moved.ckpt", tmp_path / "b.safetensors")
    del ckpt["callbacks"]["ClusterRefine"]
    torch.save(ckpt, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds 0 ClusterRefine states.*without ClusterRefine"):
        export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="cannot be read with torch.load"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.ckpt", "plain.ckpt"]  # nothing written


def test_resume_during_refinement_is_exact(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    # No shuffling: a plain DataLoader's shuffle generator is not part of a checkpoint.
    kw = dict(snap_epoch=3, start_epoch=0, logger=False, bn=True, shuffle=False, snap=dict(on_unclustered="snap"))
    full, refine_full, _, _ = _pipeline(tmp_path, epochs=6, **kw)
    _pipeline(tmp_path, epochs=5, extra=[ckpt], **kw)
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    resumed = TinyNet(bn=True)
    refine = ClusterRefine(snap_epoch=3, w=0.45, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap"))
    cbs = [SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=3), refine]
    trainer(max_epochs=6, callbacks=cbs).fit(resumed, train, val, ckpt_path=str(tmp_path / "ck" / "epoch=4.ckpt"))
    assert refine.snapped
    for name in BN_WEIGHTS:
        assert torch.equal(refine.snapper.clusters[name].assignments, refine_full.snapper.clusters[name].assignments)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_unclustered_layer_is_kept_and_reported(caplog):
    torch.manual_seed(0)
    net = TinyNet().net  # untrained: Gaussian-like weights, nothing clustered
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    snapper = ClusterSnapper(w=0.3, snap=SnapConfig(max_snap_error=0.3, on_unclustered="keep"))
    with caplog.at_level(logging.WARNING):
        reports = snapper.snap(net)
    assert all(not r.snapped and r.bits == 32.0 for r in reports.values())
    (line,) = [r.message for r in caplog.records if "did not cluster" in r.message]  # one line for all
    assert line.startswith("3 of 3 layers did not cluster") and all(f"{n} (K=" in line for n in reports)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])
    assert snapper.summary()["bits_weighted"] == 32.0

    with pytest.raises(UnclusteredLayerError, match="did not cluster.*0.weight \\(K=.*raise `grad_ratio`"):
        ClusterSnapper(snap=SnapConfig(on_unclustered="raise")).snap(net)
    # Clusters the caller passed (a post-training quantizer's, say) are not the coupling's to blame.
    two = {"0.weight": Clusters.from_quantization(quantize(net[0].weight.detach(), 2, "kmeans"))}
    with pytest.raises(UnclusteredLayerError, match="1 of 1 layers did not cluster.*0.weight.*clusters given for them fit their weights badly"):
        ClusterSnapper(snap=SnapConfig(on_unclustered="raise")).snap(net, clusters=two)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])

    forced = ClusterSnapper(snap=SnapConfig(on_unclustered="snap"))
    forced.snap(net)
    assert torch.unique(net[0].weight.detach()).numel() == forced.reports["0.weight"].k


def test_snap_with_given_centroids():
    net = TinyNet().net
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0))
    centroids = {n: torch.tensor([-0.1, 0.0, 0.1]) for n in ("0.weight", "2.weight", "4.weight")}
    snapper.snap(net, centroids=centroids)
    for n in centroids:
        assert torch.unique(dict(net.named_parameters())[n].detach()).numel() <= 3


def _tie_reference(before: dict, after: dict) -> dict:
    """Independent of the snapper: each weight set to the float64 mean of its cluster's
    members, clusters read from the snapped weights ``before`` (one value per cluster)."""
    out = {}
    for n, w0 in before.items():
        labels = torch.unique(w0, return_inverse=True)[1].reshape(-1).tolist()
        w1 = after[n].reshape(-1).double().tolist()
        sums, counts = {}, {}
        for lab, v in zip(labels, w1):
            sums[lab] = sums.get(lab, 0.0) + v
            counts[lab] = counts.get(lab, 0) + 1
        out[n] = torch.tensor([sums[lab] / counts[lab] for lab in labels], dtype=torch.float64).reshape(w0.shape)
    return out


def test_tie_sets_each_weight_to_its_cluster_mean_also_after_a_resume():
    torch.manual_seed(0)
    net = TinyNet().net
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0))
    snapper.snap(net, centroids={n: torch.tensor([-0.2, -0.05, 0.05, 0.2]) for n in ("0.weight", "2.weight", "4.weight")})
    params = dict(net.named_parameters())
    snapped = {n: params[n].detach().clone() for n in snapper.clusters}
    resumed = ClusterSnapper()
    resumed.load_state_dict(snapper.state_dict())
    with torch.no_grad():  # an optimizer step: every weight moves on its own
        for n in snapped:
            params[n].add_(0.01 * torch.randn_like(params[n]))
    stepped = {n: params[n].detach().clone() for n in snapped}
    expect = _tie_reference(snapped, stepped)
    snapper.tie(net)
    for n, cl in snapper.clusters.items():
        torch.testing.assert_close(params[n].detach().double(), expect[n], rtol=0, atol=1e-7)
        assert torch.unique(params[n].detach()).numel() == cl.k
        torch.testing.assert_close(cl.values().double(), expect[n], rtol=0, atol=1e-7)  # centroids follow
        assert cl.assignments.device == cl.counts.device == params[n].device
    # The state saved before the step, loaded into a new snapper, ties the same way.
    with torch.no_grad():
        for n in stepped:
            params[n].copy_(stepped[n])
    resumed.tie(net)
    for n in snapped:
        torch.testing.assert_close(params[n].detach().double(), expect[n], rtol=0, atol=1e-7)


def _reassign_reference(latent: dict, snapped: dict, stepped: dict, centroids: dict) -> tuple[dict, dict]:
    """Independent of the snapper, in float64 Python: the latent weights take the step made to
    the tied ones, each joins its nearest centroid, each centroid becomes its members' mean
    (an emptied one keeps its value). Returns (new weights, new latent weights)."""
    weights, latents = {}, {}
    for n, lat0 in latent.items():
        c = centroids[n].double().tolist()
        lat = [a + (b - s) for a, b, s in zip(lat0.reshape(-1).double().tolist(), stepped[n].reshape(-1).double().tolist(),
                                              snapped[n].reshape(-1).double().tolist())]
        labels = [min(range(len(c)), key=lambda k: abs(v - c[k])) for v in lat]
        sums, counts = [0.0] * len(c), [0] * len(c)
        for lab, v in zip(labels, lat):
            sums[lab] += v
            counts[lab] += 1
        means = [sums[k] / counts[k] if counts[k] else c[k] for k in range(len(c))]
        weights[n] = torch.tensor([means[lab] for lab in labels], dtype=torch.float64).reshape(lat0.shape)
        latents[n] = torch.tensor(lat, dtype=torch.float64).reshape(lat0.shape)
    return weights, latents


@pytest.mark.parametrize("resume", [False, True])
def test_reassign_moves_weights_to_their_nearest_centroid(resume):
    torch.manual_seed(0)
    net = TinyNet().net
    params = dict(net.named_parameters())
    given = {n: torch.tensor([-0.2, -0.05, 0.05, 0.2]) for n in WEIGHTS_PLAIN}
    latent = {n: params[n].detach().clone() for n in given}
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
    snapper.snap(net, centroids=given)
    if resume:  # a snapper rebuilt from the saved state steps the same way
        state = snapper.state_dict()
        snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
        snapper.load_state_dict(state)
    snapped = {n: params[n].detach().clone() for n in given}
    centroids = {n: snapper.clusters[n].centroids.clone() for n in given}
    with torch.no_grad():  # a large step: many weights cross a boundary
        for n in given:
            params[n].add_(0.05 * torch.randn_like(params[n]))
    stepped = {n: params[n].detach().clone() for n in given}
    expect, expect_latent = _reassign_reference(latent, snapped, stepped, centroids)
    old = {n: snapper.clusters[n].assignments.clone() for n in given}
    snapper.tie(net)
    moved = 0
    for n, cl in snapper.clusters.items():
        torch.testing.assert_close(params[n].detach().double(), expect[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(snapper.latent[n].double(), expect_latent[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(cl.values().double(), expect[n], rtol=0, atol=1e-6)
        assert torch.equal(cl.counts, torch.bincount(cl.assignments.reshape(-1), minlength=cl.k))
        assert torch.unique(params[n].detach()).numel() <= cl.k
        moved += int((cl.assignments != old[n]).sum())
    assert moved > 50  # the step above did reassign weights


def test_reassign_keeps_an_emptied_cluster_s_value():
    net = TinyNet().net
    params = dict(net.named_parameters())
    with torch.no_grad():  # three tight clusters
        for p in net.parameters():
            p.copy_(torch.tensor([-0.1, 0.0, 0.1])[torch.randint(3, p.shape)] + 1e-3 * torch.randn(p.shape))
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
    snapper.snap(net, centroids={n: torch.tensor([-0.1, 0.0, 0.1]) for n in WEIGHTS_PLAIN})
    middle = {n: snapper.clusters[n].assignments == 1 for n in WEIGHTS_PLAIN}
    value = {n: float(snapper.clusters[n].centroids[1]) for n in WEIGHTS_PLAIN}
    with torch.no_grad():  # a step that carries every member of the middle cluster far past the upper one
        for n in WEIGHTS_PLAIN:
            params[n][middle[n]] += 1.0
    snapper.tie(net)
    for n, cl in snapper.clusters.items():
        assert cl.k == 3 and int(cl.counts[1]) == 0
        assert float(cl.centroids[1]) == value[n] and abs(value[n]) < 0.01
        assert torch.equal(cl.assignments[middle[n]], torch.full_like(cl.assignments[middle[n]], 2))


def test_reassign_without_crossings_is_the_fixed_assignment_tie():
    torch.manual_seed(1)
    centres = torch.tensor([-0.3, -0.1, 0.1, 0.3])
    nets = [TinyNet().net for _ in range(2)]
    with torch.no_grad():  # weights already in tight clusters
        for p in nets[0].parameters():
            p.copy_(centres[torch.randint(4, p.shape)] + 1e-3 * torch.randn(p.shape))
    nets[1].load_state_dict(nets[0].state_dict())
    tied, moving = ClusterSnapper(w=0.3), ClusterSnapper(w=0.3, refine=RefineConfig(reassign=True))
    tied.snap(nets[0])
    moving.snap(nets[1])
    for _ in range(3):
        noise = {n: 0.005 * torch.randn_like(p) for n, p in nets[0].named_parameters()}
        for net, snapper in ((nets[0], tied), (nets[1], moving)):
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.add_(noise[n])
            snapper.tie(net)
    for n in tied.clusters:
        assert torch.equal(tied.clusters[n].assignments, moving.clusters[n].assignments)
        torch.testing.assert_close(dict(nets[1].named_parameters())[n], dict(nets[0].named_parameters())[n], rtol=0, atol=1e-6)


def test_reassign_refuses_a_snap_state_without_latent_weights():
    net = TinyNet().net
    tied = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0))
    tied.snap(net, centroids={n: torch.tensor([-0.1, 0.0, 0.1]) for n in WEIGHTS_PLAIN})
    with pytest.raises(ValueError, match="no latent weights.*Resume it with `reassign=False`"):
        ClusterSnapper(refine=RefineConfig(reassign=True)).load_state_dict(tied.state_dict())
    relaxed = ClusterSnapper()  # latent weights in a state are simply unused by a fixed-assignment refinement
    moving = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
    moving.snap(TinyNet().net, centroids={n: torch.tensor([-0.1, 0.0, 0.1]) for n in WEIGHTS_PLAIN})
    relaxed.load_state_dict(moving.state_dict())
    assert set(relaxed.clusters) == set(WEIGHTS_PLAIN)


def test_reassign_pipeline_resumes_exactly_and_exports(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    kw = dict(snap_epoch=3, start_epoch=0, logger=False, bn=True, shuffle=False, snap=dict(on_unclustered="snap", max_bits=2),
              refine=RefineConfig(reassign=True))
    full, refine_full, _, val = _pipeline(tmp_path, epochs=6, **kw)
    _pipeline(tmp_path, epochs=5, extra=[ckpt], **kw)
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    resumed = TinyNet(bn=True)
    refine = ClusterRefine(snap_epoch=3, w=0.45, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap", max_bits=2), refine=RefineConfig(reassign=True))
    cbs = [SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=3), refine]
    trainer(max_epochs=6, callbacks=cbs).fit(resumed, train, val, ckpt_path=str(tmp_path / "ck" / "epoch=4.ckpt"))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    params = dict(full.named_parameters())
    for name in BN_WEIGHTS:
        cl = refine_full.snapper.clusters[name]
        assert torch.equal(params[name].detach(), cl.values().reshape(params[name].shape))
        assert torch.unique(params[name].detach()).numel() <= 4
        assert refine_full.snapper.reports[name].entropy == pytest.approx(cl.entropy)
    assert accuracy(full, val) > 0.8
    save_compressed(full, tmp_path / "m.sq.safetensors", refine_full.clusters())
    state = load_compressed(tmp_path / "m.sq.safetensors")
    for name in BN_WEIGHTS:
        assert torch.equal(state[name], params[name].detach())


def test_start_latent_from_keeps_the_snapped_values_and_the_given_offsets():
    lin = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():  # coupled: two tight clusters at -1 and 1
        lin.weight.copy_(torch.tensor([[-1.01, -1.0, -0.99, -1.0, 0.99, 1.0, 1.01, 1.0]]))
    given = torch.tensor([[0.5, -1.0, -1.0, -1.5, 1.0, 1.0, 1.0, 1.0]])
    runs = {}
    for start in ("snap", "given"):
        snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
        snapper.snap(lin, centroids={"weight": torch.tensor([-1.0, 1.0])})
        if start == "given":
            snapper.start_latent_from({"weight": given})
            # Cluster 0: given mean -0.75, offsets +1.25, -0.25, -0.25, -0.75 around -1; cluster 1: offsets 0 around 1.
            torch.testing.assert_close(snapper.latent["weight"], torch.tensor([[0.25, -1.25, -1.25, -1.75, 1, 1, 1, 1.0]]))
        snapper.tie(lin)  # the tied values are the same before the tie; the first one moves the 0.25
        runs[start] = snapper.clusters["weight"], lin.weight.detach().clone()
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[-1.01, -1.0, -0.99, -1.0, 0.99, 1.0, 1.01, 1.0]]))
    cl, _ = runs["snap"]
    assert cl.assignments.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    cl, w = runs["given"]
    assert cl.assignments.flatten().tolist() == [1, 0, 0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(cl.centroids, torch.tensor([-4.25 / 3, 4.25 / 5]))
    torch.testing.assert_close(w.flatten(), cl.centroids[cl.assignments.flatten()])


def test_start_latent_from_refuses_bad_input():
    net = TinyNet().net
    tied = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0))
    tied.snap(net, centroids={n: torch.tensor([-0.1, 0.1]) for n in WEIGHTS_PLAIN})
    with pytest.raises(ValueError, match="reassign=True"):
        tied.start_latent_from({"0.weight": torch.zeros(16, 64)})
    moving = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=True))
    moving.snap(net, centroids={n: torch.tensor([-0.1, 0.1]) for n in WEIGHTS_PLAIN})
    with pytest.raises(ValueError, match="'0.bias' is not a snapped layer"):
        moving.start_latent_from({"0.bias": torch.zeros(16)})
    with pytest.raises(ValueError, match=r"0.weight has shape \(64, 64\), the given weights \(3,\)"):
        moving.start_latent_from({"0.weight": torch.zeros(3)})
    kept = moving.latent["0.weight"].clone()
    with pytest.raises(ValueError, match="'4.bias' is not a snapped layer"):  # nothing changed before the refusal
        moving.start_latent_from({"0.weight": torch.randn(64, 64), "4.bias": torch.zeros(10)})
    assert torch.equal(moving.latent["0.weight"], kept)


@pytest.mark.parametrize("build, match", [
    (lambda: RefineConfig(reassign=True, reassign_from="fit_start"), "`reassign_from` must be one of 'snap', 'coupling_start'"),
    (lambda: RefineConfig(reassign_from="coupling_start"), "needs `reassign=True`"),
    (lambda: ClusterRefine(refine=RefineConfig(reassign=True, reassign_from="coupling_start"), snap_epoch=0),
     "use `reassign_from='snap'`"),
    (lambda: ClusterRefine(refine=RefineConfig(reassign=True, reassign_from="coupling_start"), snap_epoch=None),
     "snap_epoch >= 1"),
])
def test_reassign_from_refuses_what_it_cannot_do(build, match):
    with pytest.raises(ValueError, match=match):
        build()


class _LatentAtSnap(pl.Callback):
    """After the ClusterRefine in the list: its latent weights and clusters right after the snap."""

    def __init__(self, refine, epoch):
        self.refine, self.epoch, self.seen = refine, epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            sn = self.refine.snapper
            params = dict(pl_module.named_parameters())
            self.seen = {n: (sn.latent[n].clone(), cl.assignments.clone(), cl.centroids.clone(), params[n].detach().clone())
                         for n, cl in sn.clusters.items()}


class _WeightsAt(pl.Callback):
    """The weights at the start of ``epoch`` (before its first step)."""

    def __init__(self, epoch):
        self.epoch, self.seen = epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.seen = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}


def test_reassign_from_coupling_start_spreads_the_latent_weights_as_before_coupling():
    # Trained without coupling in epoch 0, coupled in epochs 1-2, snapped at 3: the latent weights
    # start from the weights of the start of epoch 1, not those the fit began with.
    probe, before = {}, _WeightsAt(1)
    for start in ("snap", "coupling_start"):
        refine = ClusterRefine(snap_epoch=3, w=0.45, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap", max_bits=2), refine=RefineConfig(reassign=True, reassign_from=start))
        probe[start] = _LatentAtSnap(refine, 3)
        pl.seed_everything(0)
        train, val = digits_loaders(shuffle=False)
        model = TinyNet(bn=True)
        initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        cbs = [SoftQuantCallback(h=2e-3, w=0.45, start_epoch=1, stop_epoch=3), refine, probe[start], before]
        trainer(max_epochs=4, callbacks=cbs).fit(model, train, val)
        assert refine.latent_source == {}  # the copy is dropped at the snap
    across = {"snap": 0, "coupling_start": 0}
    for name in BN_WEIGHTS:
        lat_s, a_s, c_s, w_s = probe["snap"].seen[name]
        lat, a, c, w = probe["coupling_start"].seen[name]
        # The same run up to the snap: same clusters, same tied weights.
        assert torch.equal(a, a_s) and torch.equal(c, c_s) and torch.equal(w, w_s)
        assert not torch.equal(before.seen[name], initial[name])  # epoch 0 trained them
        # Reference by numpy: the pre-coupling weights minus their cluster's mean, around the centroid.
        fp, lab = before.seen[name].numpy().ravel(), a.numpy().ravel()
        ref = np.array([c[j].item() + fp[i] - fp[lab == j].mean() for i, j in enumerate(lab)])
        np.testing.assert_allclose(lat.numpy().ravel(), ref, rtol=0, atol=1e-5)
        for start, (x, cl_a, cl_c) in (("snap", (lat_s, a_s, c_s)), ("coupling_start", (lat, a, c))):
            nearest = (x.reshape(-1, 1) - cl_c.reshape(1, -1)).abs().argmin(dim=1)
            across[start] += int((nearest != cl_a.reshape(-1)).sum())
    # Latent weights past a decision boundary, which the first tie moves: none from the coupled weights.
    assert across["snap"] == 0 and across["coupling_start"] > 100


def test_reassign_from_coupling_start_follows_a_learned_codebook_window():
    from sq_lightning.callbacks import LearnedCodebook

    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    refine = ClusterRefine(snap_epoch=3, clusters_from="codebook", snap=SnapConfig(recalibrate_bn_batches=0, on_unclustered="snap"), refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
    probe, before = _LatentAtSnap(refine, 3), _WeightsAt(2)
    codebook = LearnedCodebook(lam=20.0, bits=2, start_epoch=2, stop_epoch=3, codebook_lr=1e-3)
    trainer(max_epochs=4, callbacks=[codebook, refine, probe, before]).fit(TinyNet(bn=True), train, val)
    assert probe.seen.keys() == set(BN_WEIGHTS)
    for name, (lat, a, c, _) in probe.seen.items():
        fp, lab = before.seen[name].reshape(-1), a.reshape(-1)
        for j in lab.unique():
            m = lab == j
            torch.testing.assert_close(lat.reshape(-1)[m].double(), fp[m] - fp[m].mean() + c[j].double(), rtol=0, atol=1e-5)


def test_reassign_from_coupling_start_without_coupling_before_the_snap_warns():
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    refine = ClusterRefine(snap_epoch=1, w=0.45, snap=SnapConfig(recalibrate_bn_batches=0, on_unclustered="snap", max_bits=2), refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
    probe = _LatentAtSnap(refine, 1)
    # A step window that has not opened by the snap (an epoch window that opens at the snap is refused at setup).
    with pytest.warns(UserWarning, match="the coupling had not started before the snap"):
        trainer(max_epochs=2, callbacks=[SoftQuantCallback(h=2e-3, w=0.45, start_step=1000), refine, probe]).fit(
            TinyNet(bn=True), train, val)
    for name, (lat, a, c, w) in probe.seen.items():
        assert torch.unique(lat).numel() > c.numel()  # the weights at the snap, not spread anew


def test_reassign_from_coupling_start_resumes_during_the_coupling_exactly(tmp_path):
    kw = dict(snap_epoch=3, start_epoch=0, logger=False, bn=True, shuffle=False, snap=dict(on_unclustered="snap", max_bits=2),
              refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, _, _, _ = _pipeline(tmp_path, epochs=5, **kw)
    _pipeline(tmp_path, epochs=5, extra=[ckpt, _StopAfter(2)], **kw)  # stopped after 2 coupling epochs
    saved = torch.load(tmp_path / "ck" / "epoch=1.ckpt", weights_only=False)["callbacks"]
    assert any("latent_source" in state for state in saved.values())

    def resume(drop_copy):
        pl.seed_everything(0)
        train, val = digits_loaders(shuffle=False)
        model = TinyNet(bn=True)
        refine = ClusterRefine(snap_epoch=3, w=0.45, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap", max_bits=2), refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
        path = tmp_path / "ck" / "epoch=1.ckpt"
        if drop_copy:  # a checkpoint written without the copy (e.g. by another configuration)
            state = torch.load(path, weights_only=False)
            for v in state["callbacks"].values():
                v.pop("latent_source", None)
            path = tmp_path / "nocopy.ckpt"
            torch.save(state, path)
        cbs = [SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=3), refine]
        trainer(max_epochs=5, callbacks=cbs).fit(model, train, val, ckpt_path=str(path))
        return model

    resumed = resume(drop_copy=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.warns(UserWarning, match="during the coupling, and its state holds no weights from before it"):
        other = resume(drop_copy=True)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), other.state_dict().values()))


def _heq_of(model, k=4):
    """HEQ clusters of ``model``'s three weight matrices as they are now, and a copy of those weights."""
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in BN_WEIGHTS}
    return {n: Clusters.from_quantization(quantize(w, k, "heq")) for n, w in weights.items()}, weights


def test_snap_to_given_clusters_after_fp_epochs_refines_from_the_weights_before_the_fit():
    # Two full-precision epochs, then a snap to HEQ clusters of the weights the fit began with, the
    # latent weights starting from those same weights: a post-training quantizer's clusters given the
    # refinement window a coupled run gets.
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    model = TinyNet(bn=True)
    given, initial = _heq_of(model)
    kept = copy.deepcopy(given)
    refine = ClusterRefine(snap_epoch=2, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap"), refine=RefineConfig(reassign=True, reassign_from="coupling_start")).snap_to(given)
    probe, before = _LatentAtSnap(refine, 2), _WeightsAt(2)
    trainer(max_epochs=3, callbacks=[refine, probe, before]).fit(model, train, val)
    assert probe.seen.keys() == set(given)  # only the given layers snapped, all of them
    for name, (lat, a, c, w) in probe.seen.items():
        assert not torch.equal(before.seen[name].float(), initial[name])  # the fp epochs moved the weights
        assert torch.equal(a, given[name].assignments) and torch.equal(c, given[name].centroids)
        torch.testing.assert_close(w, c[a])  # the snapped weights are the given values, not the trained ones
        # HEQ's values are its cells' means, so the per-cluster shift is zero: the latent weights are
        # exactly the weights before the fit (numpy reference of the shift, as for a coupled run).
        fp, lab = initial[name].double().numpy().ravel(), a.numpy().ravel()
        ref = np.array([c[j].item() + fp[i] - fp[lab == j].mean() for i, j in enumerate(lab)])
        np.testing.assert_allclose(lat.numpy().ravel(), ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(lat.numpy().ravel(), fp, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():  # refined on: at most 4 values a layer, tied to the latent means
        if name in given:
            assert torch.unique(p.detach()).numel() <= 4
    for name, cl in given.items():  # the caller's clusters are not the ones refinement moved
        assert all(torch.equal(getattr(cl, f), getattr(kept[name], f)) for f in ("centroids", "assignments", "counts"))


def test_snap_to_given_clusters_with_fixed_assignments_keeps_them():
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    model = TinyNet(bn=True)
    given, _ = _heq_of(model, k=3)
    given.pop(BN_WEIGHTS[2])  # a selected layer without clusters stays full precision
    refine = ClusterRefine(snap_epoch=1, snap=SnapConfig(recalibrate_bn_batches=0, on_unclustered="snap")).snap_to(given)
    trainer(max_epochs=3, callbacks=[refine]).fit(model, train, val)
    params = dict(model.named_parameters())
    assert set(refine.snapper.clusters) == set(given)
    for name, cl in given.items():
        assert torch.equal(refine.snapper.clusters[name].assignments.cpu(), cl.assignments)
        values = params[name].detach()
        assert torch.unique(values).numel() == 3
        torch.testing.assert_close(values, refine.snapper.clusters[name].centroids[cl.assignments])
    assert torch.unique(params[BN_WEIGHTS[2]].detach()).numel() > 100


def test_snap_to_refuses_what_it_cannot_snap():
    model = TinyNet(bn=True)
    given, _ = _heq_of(model)
    for bad, match in (({}, "non-empty mapping"), ({BN_WEIGHTS[0]: given[BN_WEIGHTS[0]].centroids}, "must be a Clusters")):
        with pytest.raises(ValueError, match=match):
            ClusterRefine(snap_epoch=1).snap_to(bad)
    with pytest.raises(ValueError, match="use `clusters_from='gaps'`"):
        ClusterRefine(snap_epoch=1, clusters_from="codebook").snap_to(given)
    cl = given[BN_WEIGHTS[0]]
    for bad, match in (
        ({"net.0.bias": cl}, "'net.0.bias' is not a layer this ClusterRefine selects"),
        ({BN_WEIGHTS[1]: Clusters(cl.centroids, given[BN_WEIGHTS[1]].assignments.t(), cl.counts)},
         r"given for net.3.weight have shape \(64, 32\), the layer \(32, 64\)"),
        ({BN_WEIGHTS[1]: Clusters(cl.centroids[:2], given[BN_WEIGHTS[1]].assignments, cl.counts[:2])}, "index outside its 2 centroids"),
    ):
        refine = ClusterRefine(snap_epoch=1).snap_to(bad)
        train, val = digits_loaders(shuffle=False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=match):
            trainer(max_epochs=2, callbacks=[refine]).fit(model, train, val)
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # refused before a step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reassign", [False, True])
def test_cuda_tie_makes_no_host_sync(reassign):
    net = TinyNet().net.cuda()
    snapper = ClusterSnapper(snap=SnapConfig(max_snap_error=10.0), refine=RefineConfig(reassign=reassign))
    snapper.snap(net, centroids={n: torch.tensor([-0.1, 0.0, 0.1]) for n in ("0.weight", "2.weight", "4.weight")})
    snapper.tie(net)  # the first call may move the clusters to the weights' device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        snapper.tie(net)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for n, cl in snapper.clusters.items():
        assert torch.unique(dict(net.named_parameters())[n].detach()).numel() <= cl.k


def _best_partition_sse(values: list[float], k: int) -> float:
    """Brute force: the least squared error of any split of sorted ``values`` into ``k`` runs."""
    import itertools

    x = sorted(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        bounds = (0, *cuts, len(x))
        sse = 0.0
        for a, b in zip(bounds, bounds[1:]):
            m = sum(x[a:b]) / (b - a)
            sse += sum((v - m) ** 2 for v in x[a:b])
        best = min(best, sse)
    return best


def test_kmeans_placement_keeps_k_and_is_the_optimal_snap():
    torch.manual_seed(3)
    weights = torch.randn(4, 4)  # loose: the gap partition is not the least-error one
    snapped = {}
    for placement in ("mean", "kmeans"):
        net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(weights)
        snapper = ClusterSnapper(w=0.6, snap=SnapConfig(on_unclustered="snap", merge="none", placement=placement))
        snapped[placement] = (snapper.snap(net)["0.weight"], net[0].weight.detach().clone(), snapper)
    (mean, _, _), (km, w_km, snapper) = snapped["mean"], snapped["kmeans"]
    assert km.k == mean.k == torch.unique(w_km).numel() > 2
    sse = float(((w_km - weights) ** 2).sum())
    assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), km.k), rel=1e-5)
    assert km.snap_error < 0.7 * mean.snap_error  # 0.244 vs 0.387 here (K = 5)
    # the stored clusters describe the snapped weights (refinement ties to them)
    cl = snapper.clusters["0.weight"]
    assert torch.equal(cl.values().reshape(4, 4), w_km)
    assert cl.counts.sum() == 16


def test_kmeans_placement_changes_nothing_on_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([-0.3, -0.1, 0.05, 0.2])
    weights = centers[torch.randint(0, 4, (8, 32))] + 1e-3 * torch.randn(8, 32)
    out = []
    for placement in ("mean", "kmeans"):
        net = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(weights)
        ClusterSnapper(w=0.3, snap=SnapConfig(placement=placement)).snap(net)
        out.append(net[0].weight.detach().clone())
    assert torch.unique(out[0]).numel() == 4
    torch.testing.assert_close(out[0], out[1])


def _equal_population_snap(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference HEQ for distinct values, N divisible by k: sorted ranks in k equal blocks, each at its mean."""
    flat = x.flatten().double()
    order = flat.argsort()
    out = torch.empty_like(flat)
    for block in order.chunk(k):
        out[block] = flat[block].mean()
    return out.reshape(x.shape)


@pytest.mark.parametrize("max_bits", [None, 1])
def test_heq_placement_cuts_equal_populations_at_the_discovered_k(max_bits):
    torch.manual_seed(0)
    # Four separated groups of very unequal size: the gap partition has entropy far below 2 bits.
    sizes = (200, 24, 24, 8)
    weights = torch.cat([c + 1e-3 * torch.randn(n) for c, n in zip((0.0, 0.3, -0.3, 0.6), sizes)])
    weights = weights[torch.randperm(256)].reshape(8, 32)
    reports = {}
    for placement in ("mean", "heq"):
        net = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(weights)
        snapper = ClusterSnapper(w=0.3, snap=SnapConfig(merge="none", on_unclustered="snap", placement=placement, max_bits=max_bits))
        reports[placement] = snapper.snap(net)["0.weight"]
    k = 4 if max_bits is None else 2
    assert reports["heq"].k == k
    torch.testing.assert_close(net[0].weight.detach().double(), _equal_population_snap(weights, k), rtol=0, atol=1e-6)
    assert snapper.clusters["0.weight"].counts.tolist() == [256 // k] * k
    assert reports["heq"].entropy == pytest.approx(math.log2(k))
    if max_bits is None:
        assert reports["mean"].entropy < 1.3 < reports["heq"].entropy
        assert reports["mean"].snap_error < reports["heq"].snap_error


def test_max_bits_caps_k_with_the_least_error_partition():
    torch.manual_seed(1)
    centers = torch.tensor([-0.4, -0.2, 0.0, 0.15, 0.35])
    weights = centers[torch.arange(24) % 5].reshape(4, 6) + 1e-3 * torch.randn(4, 6)
    found = {}
    for max_bits in (None, 1, 2, 3):
        net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(weights)
        rep = ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none", max_bits=max_bits)).snap(net)["0.weight"]
        found[max_bits] = (rep, net[0].weight.detach().clone())
    assert found[None][0].k == 5 and found[3][0].k == 5  # under the cap: the discovered clusters stay
    torch.testing.assert_close(found[3][1], found[None][1])
    for max_bits, k in ((1, 2), (2, 4)):
        rep, snapped = found[max_bits]
        assert rep.k == k == torch.unique(snapped).numel() and rep.bits == max_bits
        sse = float(((snapped - weights) ** 2).sum())
        assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), k), rel=1e-5)
    # A layer that did not cluster (one gap-free Gaussian blob: K = 1, snap error ~1)
    # gets the whole budget instead of a single value.
    blob = torch.randn(4, 6)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(blob)
    assert ClusterSnapper(w=3.0, snap=SnapConfig(merge="none")).find(net)["0.weight"].k < 4
    rep = ClusterSnapper(w=3.0, snap=SnapConfig(merge="none", on_unclustered="snap", max_bits=2)).snap(net)["0.weight"]
    assert rep.k == 4
    sse = float(((net[0].weight.detach() - blob) ** 2).sum())
    assert sse == pytest.approx(_best_partition_sse(blob.flatten().tolist(), 4), rel=1e-5)


def test_max_bits_repartitions_a_loose_layer_that_formed_exactly_the_budget():
    # A gap-free blob of 40 weights in [-1, 1] and one weight at 1.8: the gaps give exactly two
    # clusters (blob, outlier), the budget at 1 bit, but a loose pair (snap error ~0.9). The
    # budget's least-error partition (the blob cut near 0, the outlier with the upper half) replaces it.
    weights = torch.cat([torch.linspace(-1.0, 1.0, 40), torch.tensor([1.8])]).reshape(1, 41)
    net = torch.nn.Sequential(torch.nn.Linear(41, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weights)
    formed = ClusterSnapper(w=1.0, snap=SnapConfig(merge="none")).find(net)["0.weight"]
    assert formed.k == 2 and formed.snap_error(weights) > 0.3  # the case: at the budget, not clustered
    rep = ClusterSnapper(w=1.0, snap=SnapConfig(merge="none", on_unclustered="snap", max_bits=1)).snap(net)["0.weight"]
    assert rep.k == 2
    sse = float(((net[0].weight.detach() - weights) ** 2).sum())
    assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), 2), rel=1e-5)
    assert rep.snap_error < 0.6


def _five_clusters(seed: int) -> torch.Tensor:
    """A [4, 6] weight with five well-separated clusters (spread 1e-3)."""
    torch.manual_seed(seed)
    centers = torch.tensor([-0.4, -0.2, 0.0, 0.15, 0.35])
    return centers[torch.arange(24) % 5].reshape(4, 6) + 1e-3 * torch.randn(4, 6)


def _two_layers(weights: torch.Tensor) -> torch.nn.Sequential:
    """Two bias-free linear layers holding the same ``weights``."""
    n = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(6, 4, bias=False))
    with torch.no_grad():
        n[0].weight.copy_(weights)
        n[1].weight.copy_(weights)
    return n


def test_max_bits_overrides_give_matched_layers_their_own_budget():
    # Two layers with the same five well-separated clusters: the override's layer keeps
    # up to 2^3 (all five, as without a cap), the other is cut to 2^1 by the least-error
    # partition; an override alone (max_bits None) caps only the layer it names.
    weights = _five_clusters(seed=2)
    net = lambda: _two_layers(weights)  # noqa: E731

    snapper = ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none", max_bits=1, max_bits_overrides={r"^1\.": 3}))
    assert snapper.max_bits_for("0.weight") == 1 and snapper.max_bits_for("1.weight") == 3
    model = net()
    reps = snapper.snap(model)
    assert (reps["0.weight"].k, reps["1.weight"].k) == (2, 5)
    assert torch.unique(model[0].weight.detach()).numel() == 2 and torch.unique(model[1].weight.detach()).numel() == 5
    sse = float(((model[0].weight.detach() - weights) ** 2).sum())
    assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), 2), rel=1e-5)

    model = net()
    reps = ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none", max_bits_overrides={r"^0\.": 2})).snap(model)
    assert (reps["0.weight"].k, reps["1.weight"].k) == (4, 5)
    sse = float(((model[0].weight.detach() - weights) ** 2).sum())
    assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), 4), rel=1e-5)


def test_max_clusters_gives_a_budget_that_is_not_a_power_of_two():
    # Five well-separated clusters with a cap of 3 values (ternary): the least-squared-error
    # 3-level partition (exhaustive reference), log2(3) bits; a cap the layer fits (5)
    # keeps the discovered clusters; a max_bits_overrides entry wins over max_clusters.
    weights = _five_clusters(seed=3)
    net = lambda: _two_layers(weights)  # noqa: E731

    model = net()
    snapper = ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none", max_clusters=3, max_bits_overrides={r"^1\.": 1}))
    assert (snapper.max_clusters_for("0.weight"), snapper.max_clusters_for("1.weight")) == (3, 2)
    reps = snapper.snap(model)
    assert (reps["0.weight"].k, reps["1.weight"].k) == (3, 2)
    assert reps["0.weight"].bits == pytest.approx(math.log2(3))
    assert torch.unique(model[0].weight.detach()).numel() == 3
    for i, k in ((0, 3), (1, 2)):
        sse = float(((model[i].weight.detach() - weights) ** 2).sum())
        assert sse == pytest.approx(_best_partition_sse(weights.flatten().tolist(), k), rel=1e-5)
    model = net()
    assert ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none", max_clusters=5)).snap(model)["0.weight"].k == 5
    assert ClusterSnapper(snap=SnapConfig(max_bits=2)).max_clusters_for("x") == 4 and ClusterSnapper().max_clusters_for("x") is None


def test_max_bits_through_the_refine_callback(tmp_path, pipeline):
    # The last layer gets its own budget (3 bits): it found more clusters than that
    # uncapped (the fixture's run, same seed and schedule) and is cut to 8 values, the
    # others to 2.
    uncapped = pipeline[2].snapper.reports["net.4.weight"].k
    assert uncapped > 8
    model, refine, _, _ = _pipeline(tmp_path, logger=False, snap=dict(max_bits=1, on_unclustered="snap",
                                    max_bits_overrides={r"^net\.4\.weight$": 3}))
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        rep = refine.snapper.reports[name]
        assert rep.snapped and torch.unique(params[name].detach()).numel() == rep.k
        if name == "net.4.weight":
            assert rep.k == 8 and rep.bits == 3
        else:
            assert rep.k <= 2 and rep.bits <= 1


def test_max_clusters_through_the_refine_callback(tmp_path):
    # Ternary layers from a Trainer run, the last layer at its own 3-bit budget; the logged
    # bit-widths are log2 K_l (1.58 for a ternary layer) and the export reads back exactly.
    model, refine, _, _ = _pipeline(tmp_path, snap=dict(max_clusters=3, on_unclustered="snap", max_bits_overrides={r"^net\.4\.weight$": 3}),
                                    export=ExportConfig(str(tmp_path / "t.safetensors")))
    params = dict(model.named_parameters())
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    for name in WEIGHTS:
        rep = refine.snapper.reports[name]
        assert rep.snapped and torch.unique(params[name].detach()).numel() == rep.k
        assert rep.k == (8 if name == "net.4.weight" else 3)
        assert acc.Scalars(f"sq/bits/{name}")[-1].value == pytest.approx(math.log2(rep.k))
    state = load_compressed(refine.exported)
    for name in WEIGHTS:
        torch.testing.assert_close(state[name], params[name].detach(), rtol=0, atol=0)


def _pull_reference(w: torch.Tensor, centers: torch.Tensor, beta: float) -> torch.Tensor:
    """Independent of the snapper, in float64: each weight of ``w`` moves ``beta`` of the way
    to the mean of the weights that share its nearest entry of ``centers``."""
    w = w.double()
    labels = (w.reshape(-1, 1) - centers.double()).abs().argmin(1).reshape(w.shape)
    means = torch.stack([w[labels == j].mean() for j in range(len(centers))])
    return w + beta * (means[labels] - w)


def test_gradual_snap_follows_its_ramp_to_the_exact_tie():
    # The snap leaves the weights alone and fixes the same partition as an immediate snap;
    # tie k moves every weight ramp_from**(1 - k/steps) of the way to its cluster's current
    # mean (checked against a float64 reference at every tie, with an optimizer-like step
    # between ties); tie `steps` is exact (K values). A state saved mid-ramp resumes at the
    # same point of the ramp.
    torch.manual_seed(0)
    centers = torch.tensor([-0.4, -0.2, 0.0, 0.15, 0.35])
    weights = centers[torch.arange(24) % 5].reshape(4, 6) + 0.02 * torch.randn(4, 6)
    model, at_once = _two_layers(weights), _two_layers(weights)
    kw = dict(w=0.3, snap=SnapConfig(on_unclustered="snap", merge="none"))
    snapper = ClusterSnapper(**kw, refine=RefineConfig(ramp_steps=4, ramp_from=0.01))
    immediate = ClusterSnapper(**kw)
    reps, reps_now = snapper.snap(model), immediate.snap(at_once)
    assert torch.equal(model[0].weight.detach(), weights) and not snapper.exact  # not moved yet
    assert {n: r.k for n, r in reps.items()} == {n: r.k for n, r in reps_now.items()} == {"0.weight": 5, "1.weight": 5}
    for n in reps:
        assert torch.equal(snapper.clusters[n].assignments, immediate.clusters[n].assignments)
    assert torch.unique(at_once[0].weight.detach()).numel() == 5
    saved = None
    for k in range(6):
        with torch.no_grad():  # a step: every weight moves on its own
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        if k == 2:
            saved = (copy.deepcopy(snapper.state_dict()), [p.detach().clone() for p in model.parameters()])
        beta = 0.01 ** (1 - k / 4) if k < 4 else 1.0
        assert snapper.pull() == pytest.approx(beta, rel=1e-12)
        expect = [_pull_reference(p.detach(), centers, beta) for p in model.parameters()]
        snapper.tie(model)
        for p, e in zip(model.parameters(), expect):
            torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=1e-7)
        assert snapper.exact == (k >= 4)
        assert (torch.unique(model[0].weight.detach()).numel() == 5) == (k >= 4)

    resumed, model2 = ClusterSnapper(**kw, refine=RefineConfig(ramp_steps=4, ramp_from=0.01)), _two_layers(weights)
    resumed.load_state_dict(saved[0])
    with torch.no_grad():
        for p, v in zip(model2.parameters(), saved[1]):
            p.copy_(v)
    assert resumed.pull() == pytest.approx(0.01 ** 0.5, rel=1e-12)
    expect = [_pull_reference(p.detach(), centers, 0.01 ** 0.5) for p in model2.parameters()]
    resumed.tie(model2)
    for p, e in zip(model2.parameters(), expect):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=1e-7)
    old_state = {k: v for k, v in saved[0].items() if k != "ties"}  # written before the ramp existed
    legacy = ClusterSnapper(**kw, refine=RefineConfig(ramp_steps=4))
    legacy.load_state_dict(old_state)
    assert legacy.exact and legacy.pull() == 1.0
    finished = ClusterSnapper(**kw, refine=RefineConfig(ramp_steps=4, ramp_from=0.01))
    finished.load_state_dict(saved[0])
    finished.finish(model2)  # the rest of the ramp at once
    assert finished.exact and all(torch.unique(p.detach()).numel() == 5 for p in model2.parameters())


class _UniqueAtSnap(pl.Callback):
    """Distinct values of the first layer right after the snap epoch starts, and per batch."""

    def __init__(self, snap_epoch: int):
        self.snap_epoch, self.at_snap, self.per_batch = snap_epoch, None, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.snap_epoch:
            self.at_snap = torch.unique(pl_module.net[0].weight.detach()).numel()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= self.snap_epoch:
            self.per_batch.append(torch.unique(pl_module.net[0].weight.detach()).numel())


def test_gradual_snap_through_the_refine_callback(tmp_path):
    # A Trainer run with the snap spread over 30 batches (of the 88 left after the snap):
    # the snap epoch starts with the coupled weights, the first layer reaches its K values
    # at batch 31 and keeps them, the pull is logged, and the export reads back exactly.
    watch = _UniqueAtSnap(snap_epoch=18)
    model, refine, _, _ = _pipeline(tmp_path, extra=[watch], snap=dict(on_unclustered="snap"),
                                    refine=RefineConfig(ramp_steps=30, ramp_from=0.01),
                                    export=ExportConfig(str(tmp_path / "g.safetensors")))
    k0 = refine.snapper.reports["net.0.weight"].k
    assert watch.at_snap > 10 * k0  # the snap fixed the clusters, not the weights
    assert all(u > k0 for u in watch.per_batch[:30]) and all(u == k0 for u in watch.per_batch[30:])
    assert len(watch.per_batch) == 88
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        assert torch.unique(params[name].detach()).numel() == refine.snapper.reports[name].k
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    pulls = [e.value for e in acc.Scalars("sq/snap_pull")]
    assert pulls[0] == pytest.approx(0.01) and pulls[-1] == 1.0
    state = load_compressed(refine.exported)
    for name in WEIGHTS:
        torch.testing.assert_close(state[name], params[name].detach(), rtol=0, atol=0)


def test_gradual_snap_longer_than_the_fit_is_finished_at_fit_end(tmp_path):
    with pytest.warns(UserWarning, match="fit ended 13 steps before the gradual snap reached its exact tie"):
        model, refine, _, _ = _pipeline(tmp_path, logger=False, snap=dict(on_unclustered="snap"), refine=RefineConfig(ramp_steps=100))
    params = dict(model.named_parameters())
    assert refine.snapper.exact
    for name in WEIGHTS:
        assert torch.unique(params[name].detach()).numel() == refine.snapper.reports[name].k


def test_resume_during_a_gradual_snap_is_exact(tmp_path):
    # Snap at epoch 3 spread over 40 batches (22 per epoch): the checkpoint of epoch 3 is
    # mid-ramp; resuming from it ends where the unbroken run ends, bit for bit.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    kw = dict(snap_epoch=3, start_epoch=0, logger=False, bn=True, shuffle=False, snap=dict(on_unclustered="snap"),
              refine=RefineConfig(ramp_steps=40))
    full, _, _, _ = _pipeline(tmp_path, epochs=6, **kw)
    _pipeline(tmp_path, epochs=4, extra=[ckpt], **kw)
    pl.seed_everything(0)
    train, val = digits_loaders(shuffle=False)
    resumed = TinyNet(bn=True)
    refine = ClusterRefine(snap_epoch=3, w=0.45, snap=SnapConfig(recalibrate_bn_batches=20, on_unclustered="snap"), refine=RefineConfig(ramp_steps=40))
    cbs = [SoftQuantCallback(h=2e-3, w=0.45, stop_epoch=3), refine]
    trainer(max_epochs=6, callbacks=cbs).fit(resumed, train, val, ckpt_path=str(tmp_path / "ck" / "epoch=3.ckpt"))
    assert refine.snapper.exact
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    from sq_lightning.export import export_checkpoint

    with pytest.raises(ValueError, match=r"saved during a gradual snap .* export a checkpoint from after the ramp"):
        export_checkpoint(tmp_path / "ck" / "epoch=3.ckpt", tmp_path / "mid.safetensors")
    assert not (tmp_path / "mid.safetensors").exists()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ClusterRefine(snap_epoch=-1), "`snap_epoch` must be an int >= 0 or None"),
        (lambda: ClusterRefine(w=0), "`w` must be a finite number > 0"),
        (lambda: ClusterRefine(clusters_from="kmeans"), "`clusters_from` must be"),
        (lambda: SnapConfig(gap=-0.5), "`gap` must be > 0"),
        (lambda: SnapConfig(min_cluster_frac=1.5), "`min_cluster_frac` must be in"),
        (lambda: SnapConfig(merge="some"), "`merge` must be"),
        (lambda: SnapConfig(max_snap_error=0), "`max_snap_error` must be > 0"),
        (lambda: SnapConfig(on_unclustered="ignore"), "`on_unclustered` must be"),
        (lambda: SnapConfig(placement="median"), "`placement` must be 'mean'"),
        (lambda: SnapConfig(max_bits=0), "`max_bits` must be None"),
        (lambda: SnapConfig(max_bits=2.0), "`max_bits` must be None"),
        (lambda: SnapConfig(max_clusters=1), r"`max_clusters` must be None \(no cap\) or an int in \[2, 65536\]"),
        (lambda: SnapConfig(max_clusters=3.0), "`max_clusters` must be None"),
        (lambda: SnapConfig(max_clusters=True), "`max_clusters` must be None"),
        (lambda: SnapConfig(max_bits=2, max_clusters=3), r"`max_bits` \(2\) and `max_clusters` \(3\) are the same budget"),
        (lambda: SnapConfig(max_bits_overrides={"fc(": 2}), r"`max_bits_overrides` pattern 'fc\(' is not a valid regex"),
        (lambda: SnapConfig(max_bits_overrides={"fc": 17}), r"`max_bits_overrides\['fc'\]` must be an int in \[1, 16\], got 17\."),
        (lambda: SnapConfig(max_bits_overrides=[("fc", 4)]), r"`max_bits_overrides` must be a dict of regex -> bits, got list\."),
        (lambda: SnapConfig(max_bits_overrides=[]), r"`max_bits_overrides` must be a dict of regex -> bits, got list\."),
        (lambda: SnapConfig(recalibrate_bn_batches=-1), "`recalibrate_bn_batches` must be an int >= 0"),
        (lambda: RefineConfig(reassign="yes"), "`reassign` must be True or False"),
        (lambda: RefineConfig(ramp_steps=-1), r"`ramp_steps` must be an int >= 0 \(0: snap at once\)"),
        (lambda: RefineConfig(ramp_steps=2.5), "`ramp_steps` must be an int"),
        (lambda: RefineConfig(ramp_from=0.0), r"`ramp_from` must be a number in \(0, 1\]"),
        (lambda: RefineConfig(ramp_from=1.5), r"`ramp_from` must be a number in \(0, 1\]"),
        (lambda: RefineConfig(ramp_steps=5, reassign=True), "`ramp_steps` > 0 needs `reassign=False`"),
        (lambda: ClusterRefine(refine=RefineConfig(ramp_steps=5), snap_epoch=None),
         r"`refine.ramp_steps` > 0 .* needs a `snap_epoch` \(got snap_epoch=None"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("kwargs, moved", [
    ({"gap": 0.5}, r"`gap` is now `snap=SnapConfig\(gap=...\)` \(YAML: `snap: \{gap: ...\}`\)"),
    ({"max_bits": 2, "reassign": True}, r"`max_bits` is now `snap=SnapConfig\(max_bits=...\)`.*"
                                         r"`reassign` is now `refine=RefineConfig\(reassign=...\)`"),
    ({"snap_ramp_steps": 10}, r"`snap_ramp_steps` is now `refine=RefineConfig\(ramp_steps=...\)`"),
    ({"export_path": "m.safetensors"}, r"`export_path` is now `export=ExportConfig\(path=...\)` \(YAML: `export: \{path: ...\}`\)"),
    ({"recalibrate_bn_batches": 0}, r"`recalibrate_bn_batches` is now `snap=SnapConfig\(recalibrate_bn_batches=...\)`"),
    ({"refine": False}, r"`refine=False` is now `refine=None`"),
    ({"snap": {"gap": 0.5}}, r"`snap` must be a SnapConfig, got \{'gap': 0.5\}"),
])
def test_arguments_of_earlier_versions_name_their_new_place(kwargs, moved):
    with pytest.raises(TypeError, match=moved):
        ClusterRefine(**kwargs)
    if "refine" not in kwargs and "snap" not in kwargs:
        with pytest.raises(TypeError, match="ClusterSnapper: "):
            ClusterSnapper(**{"ramp_steps" if k == "snap_ramp_steps" else k: v for k, v in kwargs.items()})


def test_codebook_source_requires_a_codebook_callback():
    train, _ = digits_loaders()
    with pytest.raises(ValueError, match="needs a training stage that learns centroids"):
        trainer(max_steps=1, callbacks=[ClusterRefine(clusters_from="codebook")]).fit(TinyNet(), train)


def test_reassign_from_coupling_start_refuses_sharded_layers(monkeypatch):
    import sq_lightning.callbacks.cluster_refine as cr

    refine = ClusterRefine(snap_epoch=2, refine=RefineConfig(reassign=True, reassign_from="coupling_start"))
    monkeypatch.setattr(cr, "is_sharded", lambda p: True)  # as FSDP2 leaves every selected weight
    with pytest.raises(ValueError, match="sharded \\(FSDP\\).*reassign_from='snap'"):
        refine.on_fit_start(None, TinyNet())
