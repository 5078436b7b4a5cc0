"""The default snap never loses to post-training k-means at the same K_l, and a layer that did
not cluster is quantized at a bit budget (one warning for all of them), not kept float32."""

import logging

import pytest
import torch
from torch import nn

from sq_lightning.config import SnapConfig
from sq_lightning import ClusterSnapper
from sq_lightning.ops.baselines import kmeans_quantize


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        # Layer 0: five tight, well separated clusters (what coupling leaves).
        centres = torch.tensor([-0.3, -0.1, 0.0, 0.1, 0.3])
        net[0].weight.copy_(centres[torch.randint(0, 5, net[0].weight.shape)] + 1e-3 * torch.randn(48, 64))
        # Layer 2: clusters joined by a bridge of weights (a partial clustering).
        w = centres[torch.randint(0, 5, (32 * 48,))] + 0.02 * torch.randn(32 * 48)
        net[2].weight.copy_(w.reshape(32, 48))
        # Layer 4: Gaussian weights, no cluster at all.
    return net


def test_every_layer_snaps_at_no_larger_error_than_kmeans_at_its_k(caplog):
    net = _net()
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight")}
    with caplog.at_level(logging.WARNING):
        reports = ClusterSnapper(w=0.3).snap(net)
    for name, rep in reports.items():
        assert rep.snapped, name  # none kept float32 by default
        reference = kmeans_quantize(weights[name], rep.k).values
        ref_err = float((weights[name] - reference).norm() / weights[name].norm())
        assert rep.snap_error <= ref_err + 1e-6, (name, rep.snap_error, ref_err)
        assert torch.unique(dict(net.named_parameters())[name].detach()).numel() == rep.k
    assert reports["0.weight"].k == 5 and reports["0.weight"].snap_error < 0.01
    # The Gaussian layer did not cluster: optimal k-means at 16 values (4 bits), said once.
    gauss = reports["4.weight"]
    assert gauss.k == 16 and gauss.bits == 4.0
    # The report still says which layers clustered by themselves and which fell back.
    assert reports["0.weight"].clustered and not gauss.clustered and gauss.snapped
    torch.testing.assert_close(dict(net.named_parameters())["4.weight"].detach(),
                               kmeans_quantize(weights["4.weight"], 16).values)
    lines = [r.message for r in caplog.records if "did not cluster" in r.message]
    assert len(lines) == 1 and "4.weight (K=" in lines[0] and "k-means at their bit budget" in lines[0]
    assert "16 without one" in lines[0]


@pytest.mark.parametrize(("budget", "k"), [({"max_bits": 2}, 4), ({"max_clusters": 3}, 3)])
def test_the_fallback_follows_the_bit_budget(budget, k):
    net = _net()
    reports = ClusterSnapper(w=0.3, snap=SnapConfig(**budget)).snap(net)
    assert reports["4.weight"].snapped and reports["4.weight"].k == k


def test_keep_stays_an_option():
    net = _net()
    before = net[4].weight.detach().clone()
    reports = ClusterSnapper(w=0.3, snap=SnapConfig(on_unclustered="keep")).snap(net)
    assert not reports["4.weight"].snapped and reports["4.weight"].bits == 32.0
    assert torch.equal(net[4].weight.detach(), before)


def test_given_clusters_are_snapped_to_not_replaced():
    from sq_lightning.ops.clustering import Clusters

    net = _net()
    two = {"4.weight": Clusters.from_quantization(kmeans_quantize(net[4].weight.detach(), 2))}
    reports = ClusterSnapper(w=0.3).snap(net, clusters=two)
    assert reports["4.weight"].snapped and reports["4.weight"].k == 2  # the caller's choice, loose or not
    assert net[4].weight.unique().numel() == 2


def test_a_per_layer_budget_sets_that_layers_fallback():
    net = _net()
    reports = ClusterSnapper(w=0.3, snap=SnapConfig(max_bits=1, max_bits_overrides={"^4\\.": 3})).snap(net)
    assert reports["4.weight"].k == 8
