"""The converged benchmark's protocol (experiments/converged.py): every command keeps it, rows
that break it are refused, and the report's intervals and calls are right."""

import math

import pytest
import scipy.stats

from tests.helpers import load_experiment


@pytest.fixture(scope="module")
def conv():
    return load_experiment("converged")


@pytest.fixture(scope="module")
def tradeoff():
    return load_experiment("cifar10_tradeoff")


def test_every_cell_runs_on_the_same_terms(conv, tradeoff):
    seen = {}
    for cell in conv.CELLS:
        budget, _ = conv.CELLS[cell]
        for seed in conv.SEEDS:
            args = tradeoff._parse(conv.command(cell, seed))  # a command cifar10_tradeoff.py accepts
            terms = (args.pretrained, args.couple_epochs, args.refine_epochs, args.lr, args.schedule, args.edge_bits,
                     args.distill, args.reassign, args.reassign_from, args.couple_from, args.limit)
            seen.setdefault("terms", set()).add(terms)
            seen.setdefault(budget, set()).add((args.max_bits, args.max_clusters))
            assert args.seed == seed
    assert len(seen.pop("terms")) == 1  # one start, one epoch budget, one edge policy, no extras
    assert all(len(budgets) == 1 for budgets in seen.values())  # one K_l budget per column
    assert len(conv.SEEDS) >= 3


def _row(**kw):
    row = {"method": "softquant", "grad_ratio": 3.0, "w": 0.3, "max_bits": 2, "couple_epochs": 4, "refine_epochs": 2,
           "lr": 0.01, "schedule": "cosine", "edge_bits": 4, "limit_train_batches": 1.0, "seed": 0, "acc": 0.9,
           "command": "python experiments/cifar10_tradeoff.py --pretrained experiments/checkpoints/resnet20_converged.ckpt"}
    row.update(kw)
    return row


@pytest.mark.parametrize("change, reason", [
    (dict(couple_epochs=8), "couple_epochs=8"),
    (dict(distill=0.5), "extra distill=0.5"),
    (dict(reassign=True, reassign_from="coupling_start"), "extra reassign=True"),
    (dict(command="python experiments/cifar10_tradeoff.py --pretrained other.ckpt"), "another starting checkpoint"),
    (dict(edge_bits=None), "edge_bits=None"),
])
def test_rows_that_break_the_protocol_are_refused(conv, change, reason):
    assert conv.violations(_row()) == []
    cells, refused = conv.summarize([_row(**change)])
    assert cells == {} and len(refused) == 1 and reason in refused[0]


def test_interval_is_the_t_interval(conv):
    values = [0.801, 0.812, 0.795, 0.808]
    m, hw = conv.interval(values)
    lo, hi = scipy.stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=scipy.stats.sem(values))
    assert math.isclose(m - hw, lo, rel_tol=1e-12) and math.isclose(m + hw, hi, rel_tol=1e-12)
    assert math.isnan(conv.interval([0.8])[1])


def test_report_pairs_each_seed_with_post_training_heq_and_calls_ties(conv):
    def soft(seed, acc, heq):
        return _row(seed=seed, acc=acc, baselines=[{"method": "heq (post-training)", "acc": 0.1, "acc_bn": heq},
                                                   {"method": "kmeans (post-training)", "acc": 0.1, "acc_bn": heq}])
    clear = [soft(0, 0.90, 0.85), soft(1, 0.91, 0.855), soft(2, 0.905, 0.86)]
    noisy = [_row(method="refined-heq", max_bits=None, source_max_bits=2, grad_ratio=None, seed=s, acc=a)
             for s, a in ((0, 0.87), (1, 0.84), (2, 0.86))]
    cells, refused = conv.summarize(clear + noisy)
    assert refused == [] and set(cells) == {"2:softquant-default", "2:ptq-heq", "2:ptq-kmeans", "2:heq-refine"}
    page = conv.report(clear + noisy)
    line = next(x for x in page.splitlines() if x.startswith("| 2:softquant-default |"))
    assert "| 3 | 90.50 ±" in line and "(ahead)" in line
    line = next(x for x in page.splitlines() if x.startswith("| 2:heq-refine |"))
    assert "(tie)" in line  # 86.3 vs 85.5 with seeds that disagree: the interval holds zero
