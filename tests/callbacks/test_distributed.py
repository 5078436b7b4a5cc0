"""The callbacks under DDP: 2 CPU processes (gloo) against each other and against 1 process.

docs/design.md section 7: all ranks hold the same weights, so they compute the same coupling
gradient, the same clusters and the same codebooks. ``ddp_script.py`` trains under
``Trainer(strategy="ddp", devices=2)`` (Lightning starts rank 1 by re-running the script,
which cannot be done from inside pytest) and saves each rank's final state; these tests
compare the ranks bit for bit, and the coupled run with a 1-process run over the same
global batches.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.callbacks.ddp_script import RANK_1_SHIFT, run_mode

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = Path(__file__).resolve().parents[2]
PER_RANK_BATCH = 50
TIMEOUT_S = 900  # two cores shared with other jobs: a launch normally takes 20-60 s

# Set by a launcher around pytest they would make Lightning join that job instead of
# starting its own two ranks.
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def _run_ddp_script(out: Path, strategy: str = "ddp", modes: str = "soft,refine,reassign,spread,given,codebook,distill") -> str:
    """Runs the script on 2 processes; what both wrote to stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(SCRIPT), str(out), "--devices", "2", "--batch-size", str(PER_RANK_BATCH), "--strategy", strategy, "--modes", modes]
    # Own session: on a timeout the whole group (rank 0 and the rank 1 it started) goes.
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP script did not finish in {TIMEOUT_S} s:\n{output[-5000:]}")
    assert proc.returncode == 0, f"the DDP script failed (exit {proc.returncode}):\n{output[-5000:]}"
    return output


def _launch(out: Path, **kwargs) -> tuple[dict, dict]:
    """Runs the script on 2 processes into ``out``; each rank's ``{mode: {...}}``, and under
    ``"output"`` what the two processes printed."""
    output = _run_ddp_script(out, **kwargs)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert all(res["world_size"] == 2 for res in r.values())
        r["output"] = output
    return r0, r1


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``(rank 0 results, rank 1 results)``, each ``{mode: {...}}``, from one DDP launch."""
    return _launch(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp2_ranks(tmp_path_factory):
    """As ``ranks``, under ``ModelParallelStrategy`` with every Linear sharded by FSDP2
    (``fully_shard``): each rank holds half of each layer."""
    return _launch(tmp_path_factory.mktemp("fsdp2"), strategy="fsdp2", modes="soft,refine,reassign,given,resume,codebook")


@pytest.fixture(scope="module")
def soft_reference(tmp_path_factory):
    """The same coupled training in 1 process, batch ``2 · PER_RANK_BATCH``, same samples."""
    return {mode: run_mode(mode, devices=1, batch_size=2 * PER_RANK_BATCH, export_dir=tmp_path_factory.mktemp(mode))[1]
            for mode in ("soft", "plain", "distill")}


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: `{k}` differs between the ranks"


def _parameters(state_dict: dict) -> dict:
    # BatchNorm running statistics are per rank under plain DDP (no SyncBatchNorm): each
    # rank's forward updates them from its own batch after DDP broadcasts rank 0's.
    return {k: v for k, v in state_dict.items() if not k.endswith(("running_mean", "running_var"))}


def test_soft_quant_weights_are_identical_on_both_ranks(ranks):
    r0, r1 = (r["soft"] for r in ranks)
    _assert_same_tensors(r0["state_dict"], r1["state_dict"], "weights")
    assert r0["sigma"] == r1["sigma"]
    assert r0["steps_applied"] == r1["steps_applied"] == r0["global_step"] == 3 * 14


def test_ranks_together_see_the_batches_of_the_reference(ranks, soft_reference):
    # Rank r gets every other sample of one permutation, starting at r: interleaving the
    # two ranks' batch k gives the reference's batch k, every epoch.
    r0, r1 = (r["soft"]["batches"] for r in ranks)
    ref = soft_reference["soft"]["batches"]
    assert len(r0) == len(r1) == len(ref) == 3 * 14
    for k, (x0, x1, x) in enumerate(zip(r0, r1, ref)):
        assert torch.equal(torch.stack([x0, x1], 1).reshape(x.shape), x), f"batch {k}"


def test_soft_quant_under_ddp_matches_one_process_with_the_global_batch(ranks, soft_reference):
    ddp, ref, plain = ranks[0]["soft"], soft_reference["soft"], soft_reference["plain"]
    assert ddp["sigma"] == pytest.approx(ref["sigma"], rel=1e-6)
    assert ddp["steps_applied"] == ref["steps_applied"]
    # Averaging two half-batch gradients rounds differently from one full-batch mean
    # (~1e-7). The coupling gradient counts neighbours within w_l, so a pair whose
    # distance sits that close to w_l can flip one count: that moves a weight by at
    # most lr · 2 h_l / (1 - momentum) ≈ 1e-5..4e-5 here. A few flips in 42 steps stay
    # well under 2e-4, while the coupling itself moves the weights by far more (below).
    for name, expected in ref["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], expected, rtol=0, atol=2e-4, msg=lambda m: f"{name}: {m}")
    moved = max(float((ref["state_dict"][n] - plain["state_dict"][n]).abs().max()) for n in ref["state_dict"])
    assert moved > 50 * 2e-4, f"coupling moved the weights by only {moved:.2e}: the comparison proves nothing"


def test_distillation_under_ddp_matches_one_process_with_the_global_batch(ranks, soft_reference):
    """ImageClassifier(distill_from=...) with soft quantization: each rank builds the same
    teacher and the distilled, coupled weights match one process (the same bound as above)."""
    r0, r1 = (r["distill"] for r in ranks)
    ref = soft_reference["distill"]
    _assert_same_tensors(r0["state_dict"], r1["state_dict"], "weights")
    _assert_same_tensors(r0["teacher"], ref["teacher"], "teacher of rank 0")
    _assert_same_tensors(r1["teacher"], ref["teacher"], "teacher of rank 1")
    for name, expected in ref["state_dict"].items():
        torch.testing.assert_close(r0["state_dict"][name], expected, rtol=0, atol=2e-4, msg=lambda m: f"{name}: {m}")
    assert r0["global_step"] == ref["global_step"] == 3 * 14
    assert all(r["distill_loss"] > 0 for r in (r0, r1, ref))  # the teacher term was computed on every rank


def test_cluster_refine_assignments_and_weights_are_identical_on_both_ranks(ranks):
    r0, r1 = (r["refine"] for r in ranks)
    assert r0["k"] == r1["k"] and set(r0["k"]) == {"net.0.weight", "net.3.weight", "net.5.weight"}
    _assert_same_tensors(r0["assignments"], r1["assignments"], "assignments")
    _assert_same_tensors(r0["centroids"], r1["centroids"], "centroids")
    # ClusterRefine broadcasts rank 0's clusters; found on each rank alone they agree too.
    _assert_same_tensors(r0["local_assignments"], r1["local_assignments"], "clusters found per rank")
    for name, a in r0["assignments"].items():
        assert torch.equal(r0["local_assignments"][name].long().reshape(a.shape), a), name
    _assert_same_tensors(_parameters(r0["state_dict"]), _parameters(r1["state_dict"]), "weights")
    # Refinement kept every layer at exactly K_l shared values.
    for name, k in r0["k"].items():
        assert torch.unique(r0["state_dict"][name]).numel() == k, name


def test_reassigned_refinement_is_identical_on_both_ranks(ranks):
    r0, r1 = (r["reassign"] for r in ranks)
    assert r0["k"] == r1["k"] == {"net.0.weight": 2, "net.3.weight": 2, "net.5.weight": 2}
    _assert_same_tensors(r0["assignments"], r1["assignments"], "assignments")
    _assert_same_tensors(r0["centroids"], r1["centroids"], "centroids")
    _assert_same_tensors(r0["latent"], r1["latent"], "latent weights")
    _assert_same_tensors(_parameters(r0["state_dict"]), _parameters(r1["state_dict"]), "weights")
    moved = sum(int((r0["local_assignments"][n].long().reshape(a.shape) != a).sum()) for n, a in r0["assignments"].items())
    assert moved > 0, "no weight changed cluster during refinement: the run tested the fixed-assignment path only"
    for name, k in r0["k"].items():
        assert torch.unique(r0["state_dict"][name]).numel() <= k, name


def test_latent_weights_from_coupling_start_are_identical_on_both_ranks(ranks):
    r0, r1 = (r["spread"] for r in ranks)
    _assert_same_tensors(r0["latent"], r1["latent"], "latent weights")
    _assert_same_tensors(_parameters(r0["state_dict"]), _parameters(r1["state_dict"]), "weights")
    assert r0["at_snap"].keys() == {"net.0.weight", "net.3.weight", "net.5.weight"}
    for name, (latent, a, c) in r0["at_snap"].items():
        for t0, t1 in zip(r0["at_snap"][name], r1["at_snap"][name], strict=True):
            assert torch.equal(t0, t1), name
        # Each member's offset from its cluster's mean before coupling, around the snapped value.
        fp, lab = r0["coupling_start"][name].double().reshape(-1), a.reshape(-1)
        for j in range(c.numel()):
            m = lab == j
            torch.testing.assert_close(latent.reshape(-1)[m].double(), fp[m] - fp[m].mean() + c[j].double(),
                                       rtol=0, atol=1e-5)


def _assert_rank_0_given_clusters_won(r0: dict, r1: dict) -> None:
    """``snap_to`` was handed different clusters on the two ranks: both snapped to rank 0's."""
    assert r0["at_snap"]["assignments"].keys() == r0["given"].keys() == {"net.0.weight", "net.3.weight", "net.5.weight"}
    for name, g in r0["given"].items():
        torch.testing.assert_close(r1["given"][name].centroids, g.centroids + RANK_1_SHIFT)  # rank 1 was given others
        for r in (r0, r1):
            assert torch.equal(r["at_snap"]["assignments"][name], g.assignments), name
            assert torch.equal(r["at_snap"]["centroids"][name], g.centroids), name
    for what in ("assignments", "centroids", "latent"):
        _assert_same_tensors(r0[what], r1[what], what)
        _assert_same_tensors(r0["at_snap"][what], r1["at_snap"][what], f"{what} at the snap")
    _assert_same_tensors(_parameters(r0["state_dict"]), _parameters(r1["state_dict"]), "weights")
    # Refinement went on from the given clusters: every weight holds its (moved) cluster's value.
    for name, a in r0["assignments"].items():
        assert torch.equal(r0["state_dict"][name], r0["centroids"][name][a]), name
    assert any(not torch.equal(r0["centroids"][n], g.centroids) for n, g in r0["given"].items())


def test_snap_to_given_clusters_under_ddp_snaps_both_ranks_to_rank_0s(ranks):
    r0, r1 = (r["given"] for r in ranks)
    _assert_rank_0_given_clusters_won(r0, r1)
    # reassign_from="coupling_start" without coupling: the latent weights at the snap are the
    # weights the fit began with (HEQ's values are its cells' means: a zero per-cluster shift).
    for name, w in r0["initial"].items():
        torch.testing.assert_close(r0["at_snap"]["latent"][name], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_warning_every_rank_would_give_alike_is_logged_once(strategy, ranks, fsdp2_ranks):
    # The "given" mode's HEQ clusters fit its three layers badly (on_unclustered="snap"): the
    # snapper's warning, one a layer, comes from rank 0 alone (each rank gave it before).
    output = (ranks if strategy == "ddp" else fsdp2_ranks)[0]["output"]
    lines = [line for line in output.splitlines() if "did not cluster" in line and "The clusters given" in line]
    assert len(lines) == 1
    for name in ("net.0.weight", "net.3.weight", "net.5.weight"):
        assert f"{name} (K=4, error" in lines[0], name


def test_cluster_refine_export_is_written_once_by_rank_0(ranks):
    from sq_lightning.export import load_compressed

    r0, r1 = (r["refine"] for r in ranks)
    path = Path(r0["exported"])
    assert r1["exported"] is None  # rank 1 wrote nothing
    assert sorted(p.name for p in path.parent.iterdir() if "refine.sq" in p.name) == [path.name]  # no temporaries
    state = load_compressed(path)
    _assert_same_tensors(state, r0["state_dict"], "exported vs rank 0's model")
    assert r0["export_bytes"] == path.stat().st_size and r1["export_bytes"] is None  # logged by rank 0


def test_learned_codebooks_and_weights_are_identical_on_both_ranks(ranks):
    r0, r1 = (r["codebook"] for r in ranks)
    assert set(r0["codebooks"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    _assert_same_tensors(r0["codebooks"], r1["codebooks"], "codebooks")
    _assert_same_tensors(r0["state_dict"], r1["state_dict"], "weights")
    assert r0["codebook_steps"] == r1["codebook_steps"] == 2 * 14  # epochs 1 and 2


# -- FSDP2 (ModelParallelStrategy + fully_shard): the same modes with sharded layers ----------
# The exactness of the sharded arithmetic against one process, step by step, is in
# test_fsdp.py; these run the callbacks through Lightning's own FSDP2 strategy.


def test_soft_quant_under_fsdp2_matches_one_process_with_the_global_batch(fsdp2_ranks, soft_reference):
    r0, r1 = (r["soft"] for r in fsdp2_ranks)
    _assert_same_tensors(r0["state_dict"], r1["state_dict"], "gathered weights")
    ref, plain = soft_reference["soft"], soft_reference["plain"]
    assert r0["sigma"] == pytest.approx(ref["sigma"], rel=1e-6)
    assert r0["steps_applied"] == ref["steps_applied"] == 3 * 14
    # Same tolerance and reason as under DDP above (rounding of the reduced gradient).
    for name, expected in ref["state_dict"].items():
        torch.testing.assert_close(r0["state_dict"][name], expected, rtol=0, atol=2e-4, msg=lambda m: f"{name}: {m}")
    moved = max(float((ref["state_dict"][n] - plain["state_dict"][n]).abs().max()) for n in ref["state_dict"])
    assert moved > 50 * 2e-4


@pytest.mark.parametrize("mode", ["refine", "reassign"])
def test_cluster_refine_under_fsdp2_ties_the_whole_layers_alike_on_both_ranks(fsdp2_ranks, mode):
    r0, r1 = (r[mode] for r in fsdp2_ranks)
    assert r0["k"] == r1["k"] and set(r0["k"]) == {"net.0.weight", "net.3.weight", "net.5.weight"}
    if mode == "reassign":
        assert set(r0["k"].values()) == {2}
    _assert_same_tensors(r0["assignments"], r1["assignments"], "gathered assignments")
    _assert_same_tensors(r0["centroids"], r1["centroids"], "centroids")
    _assert_same_tensors(r0["latent"], r1["latent"], "gathered latent weights")
    _assert_same_tensors(_parameters(r0["state_dict"]), _parameters(r1["state_dict"]), "gathered weights")
    moved = 0
    for name, a in r0["assignments"].items():
        # Every weight of the whole layer holds exactly its cluster's value.
        assert torch.equal(r0["state_dict"][name], r0["centroids"][name][a]), name
        assert a.shape == r0["state_dict"][name].shape
        moved += int((r0["local_assignments"][name].long().reshape(a.shape) != a).sum())
    if mode == "reassign":
        assert moved > 0 and set(r0["latent"]) == set(r0["k"])
    else:  # fixed assignments: the ones found at the snap (on the gathered layers, on each rank)
        assert moved == 0 and r0["latent"] == {}


def test_snap_to_given_whole_layer_clusters_under_fsdp2_snaps_both_ranks_to_rank_0s(fsdp2_ranks):
    # The given clusters are whole layers while each rank holds half of each: both ranks snap
    # their slices to rank 0's clusters (latent weights from the snap: FSDP2 refuses the other source).
    r0, r1 = (r["given"] for r in fsdp2_ranks)
    _assert_rank_0_given_clusters_won(r0, r1)
    for name, g in r0["given"].items():
        lat = r0["at_snap"]["latent"][name]
        assert lat.shape == g.assignments.shape, name
        assert not torch.equal(lat, g.centroids[g.assignments]), f"{name}: the latent weights are the snapped values"


def test_reassigned_refinement_under_fsdp2_resumes_from_a_sharded_checkpoint_bit_exact(fsdp2_ranks):
    # Stopped one epoch after the snap, resumed from the sharded (torch.distributed.checkpoint)
    # `last.ckpt`: the callbacks' whole-layer state is cut back into slices on each rank.
    for r in fsdp2_ranks:
        whole, resumed = r["reassign"], r["resume"]
        assert resumed["global_step"] == whole["global_step"]
        _assert_same_tensors(_parameters(resumed["state_dict"]), _parameters(whole["state_dict"]), "resumed vs uninterrupted weights")
        _assert_same_tensors(resumed["assignments"], whole["assignments"], "assignments")
        _assert_same_tensors(resumed["centroids"], whole["centroids"], "centroids")
        _assert_same_tensors(resumed["latent"], whole["latent"], "latent weights")


def test_cluster_refine_export_under_fsdp2_holds_the_gathered_model(fsdp2_ranks):
    from sq_lightning.export import load_compressed

    r0, r1 = (r["refine"] for r in fsdp2_ranks)
    path = Path(r0["exported"])
    assert r1["exported"] is None and r1["export_bytes"] is None
    assert sorted(p.name for p in path.parent.iterdir() if "refine.sq" in p.name) == [path.name]
    state = load_compressed(path)
    # The whole layers, and rank 0's BatchNorm statistics (FSDP2 keeps buffers per rank).
    _assert_same_tensors(state, r0["state_dict"], "exported vs rank 0's gathered model")


def test_learned_codebooks_under_fsdp2_are_identical_on_both_ranks(fsdp2_ranks):
    r0, r1 = (r["codebook"] for r in fsdp2_ranks)
    assert set(r0["codebooks"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    _assert_same_tensors(r0["codebooks"], r1["codebooks"], "codebooks")
    _assert_same_tensors(r0["state_dict"], r1["state_dict"], "gathered weights")
    assert r0["codebook_steps"] == r1["codebook_steps"] == 2 * 14
