"""benchmarks/refine_coupled.py: the refinement runs at the tail of the coupling run's cosine, and the
full-precision start reaches ClusterRefine's latent weights."""

import math

import pytest
import torch

from sq_lightning.callbacks import ClusterRefine
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def rc():
    return load_benchmark("refine_coupled")


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
    refine = ClusterRefine(w=0.5, reassign=True, module_types=["Linear"], on_unclustered="snap")
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
