"""experiments/refine_coupled.py: the refinement runs at the tail of the coupling run's cosine, and the
full-precision start reaches ClusterRefine's latent weights."""

import math

import pytest
import torch

from sq_lightning.config import RefineConfig, SnapConfig
from sq_lightning.callbacks import ClusterRefine
from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def rc():
    return load_experiment("refine_coupled")


def test_tail_cosine_gives_the_learning_rates_of_the_run_s_last_epochs(rc):
    module = rc.TailCosine(4, 6, arch="resnet20", lr=0.01, schedule="cosine")
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(2):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Epochs 4 and 5 of a cosine over 6 epochs: 0.01 * (1 + cos(pi * e / 6)) / 2.
    assert seen == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 6)) / 2 for e in (4, 5)], rel=1e-9)
    assert seen == pytest.approx([0.0025, 0.01 * (1 - math.sqrt(3) / 2) / 2])


def test_latent_from_fp_replaces_the_latent_weights_after_the_snap(rc):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([-0.5, 0.5])[torch.randint(2, (4, 6))])
    fp = {"0.weight": torch.randn(4, 6)}
    refine = ClusterRefine(w=0.5, module_types=["Linear"], snap=SnapConfig(on_unclustered="snap"), refine=RefineConfig(reassign=True))
    refine.snapper.snap(net)
    cl = refine.snapper.clusters["0.weight"]
    before = refine.snapper.latent["0.weight"].clone()

    class T:
        current_epoch = 0

    rc.LatentFromFP(refine, {"0.weight": fp["0.weight"]}).on_train_epoch_start(T(), net)
    after = refine.snapper.latent["0.weight"]
    a = cl.assignments.reshape(-1)
    for j in range(cl.k):  # each cluster: the fp offsets around the snapped value
        members = a == j
        expect = fp["0.weight"].reshape(-1)[members] - fp["0.weight"].reshape(-1)[members].mean() + cl.centroids[j]
        torch.testing.assert_close(after.reshape(-1)[members], expect)
    assert not torch.equal(after, before)


def test_spread_like_keeps_the_coupled_order_and_takes_the_fp_width_per_cluster(rc):
    coupled = torch.tensor([0.48, 0.50, 0.52, -0.49, -0.50, -0.51, 0.50])
    fp = torch.tensor([0.1, 0.5, 0.9, -0.2, -0.4, -0.6, 0.3])
    a = torch.tensor([1, 1, 1, 0, 0, 0, 1])
    out = rc.spread_like(coupled, fp, a, 2)
    for j in range(2):
        m = a == j
        oc, of = coupled[m].double() - coupled[m].double().mean(), fp[m].double() - fp[m].double().mean()
        assert out[m].mean().item() == pytest.approx(0.0, abs=1e-12)
        assert out[m].std().item() == pytest.approx(of.std().item(), rel=1e-9)
        # A positive multiple of the coupled offsets: the coupling's order inside the cluster is kept.
        torch.testing.assert_close(out[m], oc * (of.std() / oc.std()))
    # A cluster with no coupled spread (or a single member) keeps its members on the mean.
    flat = rc.spread_like(torch.tensor([0.5, 0.5, -0.5]), torch.tensor([0.2, 0.8, -0.5]), torch.tensor([1, 1, 0]), 2)
    assert torch.equal(flat, torch.zeros(3, dtype=torch.float64))


def test_first_step_moves_counts_latent_weights_nearer_another_centroid(rc):
    net = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-0.5, -0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5]]))
    refine = ClusterRefine(w=0.5, module_types=["Linear"], snap=SnapConfig(on_unclustered="snap"), refine=RefineConfig(reassign=True))
    refine.snapper.snap(net)
    assert rc.first_step_moves(refine.snapper) == 0.0
    cl = refine.snapper.clusters["0.weight"]
    # Two of the eight latent weights put past the midpoint between the two centroids.
    latent = cl.centroids[cl.assignments].clone().reshape(-1)
    latent[0] = -latent[0] * 0.9
    latent[5] = -latent[5] * 0.2
    refine.snapper.latent["0.weight"] = latent.reshape(2, 4)
    assert rc.first_step_moves(refine.snapper) == pytest.approx(2 / 8)
