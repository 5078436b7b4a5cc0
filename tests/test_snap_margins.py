"""experiments/snap_margins.py: the margin of each weight to its nearest decision boundary, the share of
formed clusters a budget splits, and the level agreement of two partitions, against hand-worked values."""

import math
import sys
from pathlib import Path

import pytest
import torch

from sq_lightning.ops.clustering import Clusters
from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def margins():
    return load_experiment("snap_margins")


def _clusters(centroids, assignments):
    c, a = torch.tensor(centroids), torch.tensor(assignments)
    return Clusters(c, a, torch.bincount(a, minlength=c.numel()))


def test_margin_is_the_distance_to_the_nearest_midpoint_in_spacings(margins):
    # Values -1, 0, 2: boundaries at -0.5 (spacing 1) and 1 (spacing 2).
    theta = torch.tensor([[-0.5, -0.45, 0.0], [0.9, 1.5, 3.0]])
    got = margins.boundary_margins(theta, torch.tensor([2.0, -1.0, 0.0]))  # unsorted on purpose
    want = [0.0, 0.05, min(0.5 / 1, 1.0 / 2), 0.1 / 2, 0.5 / 2, 2.0 / 2]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert torch.isinf(margins.boundary_margins(theta, torch.tensor([0.3]))).all()


def test_split_share_counts_the_members_of_formed_clusters_given_two_values(margins):
    formed = _clusters([-1.0, 0.0, 1.0], [0, 0, 1, 1, 1, 2, 2, 2])
    # The budget cuts the middle formed cluster (3 of 8 weights) and keeps the outer ones whole.
    budget = _clusters([-0.5, 0.8], [0, 0, 0, 1, 1, 1, 1, 1])
    assert margins.split_share(formed, budget) == pytest.approx(3 / 8)
    assert margins.split_share(formed, _clusters([-1.0, 0.5], [0, 0, 1, 1, 1, 1, 1, 1])) == 0.0
    assert margins.level_agreement(budget, _clusters([-1.0, 0.5], [0, 0, 1, 1, 1, 1, 1, 1])) == pytest.approx(7 / 8)


def test_zero_cluster_correlation_and_the_sign_split(margins):
    formed = _clusters([-1.0, 0.05, 1.0], [0, 1, 1, 1, 1, 2])
    assert margins.zero_cluster(formed).tolist() == [False, True, True, True, True, False]
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert margins.correlation(x, y) == pytest.approx(0.8)  # deviations (-1.5, -.5, .5, 1.5), (-1.5, .5, -.5, 1.5): 4 / 5
    assert margins.correlation(x, -2 * x) == pytest.approx(-1.0)
    assert math.isnan(margins.correlation(x[:2], y[:2])) and math.isnan(margins.correlation(x, torch.ones(4)))
    # Two values; weights 1-4 are the zero cluster, moved by the sign of their reference.
    budget = _clusters([-0.9, 0.3], [0, 1, 1, 1, 1, 1])
    theta = torch.tensor([-1.0, 0.02, 0.04, 0.06, 0.08, 1.0])
    reference = torch.tensor([-0.5, -0.1, 0.2, -0.3, 0.4, 0.9])
    got = margins.split_by_sign(budget, margins.zero_cluster(formed), reference, theta)
    assert got.assignments.tolist() == [0, 0, 1, 0, 1, 1]
    torch.testing.assert_close(got.centroids, torch.tensor([(-1.0 + 0.02 + 0.06) / 3, (0.04 + 0.08 + 1.0) / 3]))
    assert got.counts.tolist() == [3, 3]


def test_the_script_reports_a_full_precision_model_against_itself(margins, tmp_path):
    # The full-precision checkpoint as its own "coupled" weights: every budgeted layer is cut into
    # two by k-means (coupled column) and by HEQ (full-precision column) of the same weights.
    ckpt = Path(__file__).resolve().parents[1] / "experiments" / "checkpoints" / "resnet20_cifar10_fp.ckpt"
    out = tmp_path / "m.md"
    argv = ["snap_margins.py", "--pretrained", str(ckpt), "--coupled", str(ckpt), "--w", "0.9", "--max-bits", "1",
            "--edge-bits", "4", "--out", str(out)]
    old, sys.argv = sys.argv, argv
    try:
        margins.main()
    finally:
        sys.argv = old
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    cells = {r.split("|")[1].strip().strip("*"): [c.strip().strip("*") for c in r.strip("|").split("|")] for r in rows[1:]}
    assert cells["conv1.weight"][3] == "16" and cells["fc.weight"][3] == "16"  # --edge-bits 4
    total = cells["all budgeted (267264 weights)"]
    near5_coupled, near5_fp = float(total[7]), float(total[8])
    # A Gaussian-like layer cut in two at about its median: ~ the same share near the cut either way.
    assert 0.02 < near5_coupled < 0.15 and 0.02 < near5_fp < 0.15
    layers = [n for n in cells if n.startswith("layer")]
    assert all(float(cells[n][3]) == 2 for n in layers)
    # The budget's k-means cut of a layer never has a larger snap error than HEQ's of the same weights.
    assert all(float(cells[n][11]) <= float(cells[n][12]) + 1e-3 for n in layers)
    assert not math.isnan(float(total[13]))
    # The same weights on both sides: the zero cluster remembers its full-precision values exactly.
    assert float(total[6]) == pytest.approx(1.0, abs=1e-3)
