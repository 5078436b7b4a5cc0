"""The model zoo script runs the documented default end to end and reports ties as ties."""

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo", REPO / "experiments" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_recipe_runs_on_a_module_without_forward(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CACHE", tmp_path)
    monkeypatch.setitem(zoo.SETUPS, "no-forward", zoo.Setup(zoo.NoForward, zoo._digits, "acc", 3, 2, 1, 5, timed_steps=4))
    row = zoo.run("no-forward", seed=0)
    assert row["layers"] == 3 and 0 <= row["clustered"] <= 3
    # Bits are the weight-weighted log2 K_l of the selected layers (no layer kept float32 by default).
    numel = {"model.0.weight": 64 * 256, "model.3.weight": 256 * 128, "model.6.weight": 128 * 10}
    assert set(row["k"]) == set(numel)
    expect = sum(numel[n] * math.log2(k) for n, k in row["k"].items()) / sum(numel.values())
    assert row["bits"] == pytest.approx(expect)
    for key in ("fp", "default", "ptq_heq", "ptq_kmeans", "kmeans_refine"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["step_ratio"] > 0


def test_a_difference_whose_interval_contains_zero_is_a_tie(zoo):
    assert zoo._diff_ci([0.90, 0.91, 0.92], [0.905, 0.905, 0.915]).endswith("(tie)")
    assert zoo._diff_ci([0.90, 0.91, 0.92], [0.80, 0.81, 0.815]).endswith("(better)")
    assert zoo._diff_ci([0.5], [0.4]) == "+0.1000 (1 seed)"
