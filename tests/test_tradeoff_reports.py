"""The CIFAR-10 trade-off script: its report picks, per bit budget, the best configuration of each method
by its mean over seeds, and measures its gap to the right full-precision references; a rerun skips the
runs already in its results file and a control takes its K_l from its own soft quantization row."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import load_experiment

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "cifar10_tradeoff.py"


@pytest.fixture(scope="module")
def report():
    return load_experiment("cifar10_tradeoff")


def _soft(acc, bits, seed=0, h=5e-3, epochs=(4, 2), baselines=()):
    return {"method": "softquant", "h": h, "w": 0.9, "couple_epochs": epochs[0], "refine_epochs": epochs[1],
            "schedule": "cosine", "lr": 0.01, "device": "cpu", "bits_weighted": bits, "acc": acc, "seed": seed,
            "baselines": list(baselines)}


def _peer(method, acc, n_bits, seed=0):
    return {"method": method, "n_bits": n_bits, "couple_epochs": 4, "refine_epochs": 2, "schedule": "cosine",
            "lr": 0.01, "device": "cpu", "bits_weighted": float(n_bits), "acc": acc, "seed": seed, "baselines": []}


def _cells(md_line):
    return [c.strip() for c in md_line.strip("|").split("|")]


def test_summary_ranks_configurations_by_their_seed_mean(report):
    kmeans = {"method": "kmeans (optimal 1-D)", "acc": 0.5, "acc_bn": 0.7}
    rows = [
        # h=5e-3 over two seeds has the best single row (0.82) but a mean of 0.81: h=1e-3's 0.815 ranks first.
        _soft(0.80, 1.90, seed=0, baselines=[kmeans]),
        _soft(0.82, 1.94, seed=1, baselines=[kmeans]),
        _soft(0.815, 1.96, h=1e-3),
        _soft(0.83, 2.60, h=2e-2),  # over the 2-bit budget: only under 4 bits
        _peer("dkm", 0.83, 2, seed=0),
        _peer("dkm", 0.84, 2, seed=1),
        _peer("codebook", 0.70, 1),
    ]
    fps = [{"method": "fp-finetuned", "couple_epochs": 4, "refine_epochs": 2, "schedule": "cosine", "lr": 0.01,
            "device": "cpu", "acc": 0.85}]
    sched = lambda r: f", seed {r['seed']}" if r.get("seed") else ""  # noqa: E731
    lines, points = report._summary(0.84, rows, fps, sched)
    table = [_cells(line) for line in lines if line.startswith("| <=")]
    by = {(c[0], c[1]): c for c in table}

    soft2 = by[("<= 2 bits", "soft quantization + refine")]
    assert soft2[2].startswith("h=0.001") and "seed" not in soft2[2]
    assert soft2[3] == "1" and soft2[4] == "0.8150"
    assert soft2[5] == "2.50" and soft2[6] == "3.50"  # 0.84 - 0.815 and 0.85 - 0.815, in points
    assert soft2[7] == "1.96"
    dkm2 = by[("<= 2 bits", "coremltools DKM")]  # two seeds: their mean, bits and gaps
    assert dkm2[2].startswith("n_bits=2") and "seed" not in dkm2[2]
    assert dkm2[3] == "2" and dkm2[4] == "0.8350" and dkm2[5] == "0.50" and dkm2[6] == "1.50"
    assert by[("<= 2 bits", "post-training k-means + BN")][4] == "0.7000"

    soft4 = by[("<= 4 bits", "soft quantization + refine")]
    assert soft4[2].startswith("h=0.02") and soft4[4] == "0.8300"
    # Nothing of soft quantization fits 1 bit; method B's 1-bit row does, and also every larger budget.
    assert ("<= 1 bit", "soft quantization + refine") not in by
    assert by[("<= 1 bit", "method B + refine")][4] == "0.7000"
    assert ("<= 2 bits", "method B + refine") in by
    # The plot's curves carry the same figures.
    assert points["soft quantization + refine"] == [(2, pytest.approx(0.815)), (4, pytest.approx(0.83))]


def test_seeds_of_one_configuration_on_two_devices_are_pooled(report):
    gpu = [{**_soft(0.839, 1.96, seed=s, epochs=(16, 8)), "device": "cuda (NVIDIA H200)"} for s in (0, 1)]
    cpu = {**_soft(0.80, 1.96, seed=2, epochs=(16, 8))}  # the third seed, finished on the CPU
    other = _soft(0.83, 1.96, seed=0, h=1e-3, epochs=(16, 8))  # one seed, above the pooled mean, below the GPU pair's
    best, mean, r0 = report._best_config([*gpu, cpu, other])
    assert best == [other] and mean == pytest.approx(0.83)  # the pooled three (0.826) rank under it
    best, mean, r0 = report._best_config([*gpu, cpu])
    assert len(best) == 3 and mean == pytest.approx((0.839 * 2 + 0.80) / 3) and r0["seed"] == 0
    assert report._devices(best) == "cpu + cuda (NVIDIA H200)"
    lines, _ = report._summary(0.84, [*gpu, cpu], [], lambda r: "")
    row = next(_cells(line) for line in lines if line.startswith("| <= 2 bits | soft quantization"))
    assert row[2].endswith("cpu + cuda (NVIDIA H200)") and row[3] == "3" and row[4] == "0.8260"


def test_targets_judge_the_best_configuration_by_its_seed_mean(report):
    heq = {"method": "heq (histogram-equalized)", "acc": 0.3, "acc_bn": 0.805}
    soft = [
        _soft(0.80, 1.90, seed=0, baselines=[heq]),  # h=5e-3: best single row, mean 0.81
        _soft(0.82, 1.94, seed=1, baselines=[heq]),
        _soft(0.815, 1.96, h=1e-3, baselines=[heq]),  # h=1e-3: mean 0.815, the best configuration
    ]
    others = [_peer("dkm", 0.82, 2, seed=0), _peer("dkm", 0.85, 2, seed=1), _peer("codebook", 0.838, 2)]
    controls = [{"method": "refined-heq", "h": 5e-3, "w": 0.9, "source_acc": 0.80, "acc": 0.81, "bits_weighted": 1.90}]
    fps = [{"method": "fp-finetuned", "couple_epochs": 4, "refine_epochs": 2, "schedule": "cosine", "lr": 0.01,
            "device": "cpu", "acc": 0.85}]
    sched = lambda r: f", seed {r['seed']}" if r.get("seed") else ""  # noqa: E731
    lines = report._targets(0.84, soft, controls, others, fps, sched)
    beat = next(line for line in lines if line.startswith("- Beat post-training HEQ"))
    assert "2 of 3 rows" in beat and "1.90 bits (0.8000 vs 0.8050)" in beat
    pairs = next(line for line in lines if line.startswith("- Against HEQ"))
    assert "ahead in 0 of 1 pairs" in pairs and "1.90 bits: 0.8000 vs 0.8100" in pairs
    two = next(line for line in lines if line.startswith("- Degradation at <= 2 bits"))
    assert "h=0.001" in two and "0.8150 over 1 seed(s), 2.50 points below full precision (not met)" in two
    assert "3.50 below the full-precision model trained on for the same 6 epochs (0.8500)" in two
    # The best other configuration: method B's single row (0.838) ahead of DKM, whose best seed is higher (0.85)
    # but whose mean over two seeds is lower (0.835).
    assert "codebook 2 bit(s)" in two and "0.8380 over 1 seed(s), 0.20 points below" in two
    assert "1.20 below the full-precision model trained on for the same 6 epochs" in two.split("best other")[1]


def test_a_target_line_shows_the_seeds_behind_its_mean(report):
    # Three seeds of one configuration, listed out of order: the line gives each seed's accuracy in seed
    # order, the sample standard deviation and the standard error of their mean (numpy as the reference).
    heq = {"method": "heq (histogram-equalized)", "acc": 0.3, "acc_bn": 0.5}
    accs = {2: 0.8221, 0: 0.8290, 1: 0.8140}
    soft = [_soft(a, 1.01, seed=s, h=1e-3, baselines=[heq]) for s, a in accs.items()]
    lines = report._targets(0.8437, soft, [], [_peer("dkm", 0.826, 1)], [], lambda r: "")
    one = next(line for line in lines if line.startswith("- Degradation at <= 1 bits"))
    values = np.array([accs[s] for s in sorted(accs)])
    sd = values.std(ddof=1)
    assert (f"0.8217 over 3 seed(s) (seeds 0 / 1 / 2: 0.8290 / 0.8140 / 0.8221; sd {sd:.4f}, "
            f"standard error {sd / np.sqrt(3):.4f}), 2.20 points below full precision (not met)") in one
    assert f"{sd:.4f}" == "0.0075"
    # A single seed has no spread to show.
    assert "0.8260 over 1 seed(s), 1.77 points below" in one


def test_a_target_step_run_is_its_own_configuration(report):
    # Runs with a target step store the (unused) h of --points: they must not pool with a plain run of that h.
    plain = _soft(0.80, 1.90)
    stepped = {**_soft(0.70, 1.95), "target_step": 0.003}
    best, mean, r0 = report._best_config([plain, stepped])
    assert best == [plain] and mean == pytest.approx(0.80)
    assert report._label(stepped, report.SHORT_NAMES)[1].startswith("S=0.003, w=0.9")


def test_configurations_are_told_apart_by_every_stored_option(report):
    # An option that no label or schedule text shows still makes its own configuration...
    plain = [_soft(0.80, 1.90, seed=0), _soft(0.82, 1.90, seed=1)]
    unseen = {**_soft(0.815, 1.90), "some_future_option": 3}
    best, mean, r0 = report._best_config([*plain, unseen])
    assert best == [unseen] and mean == pytest.approx(0.815)
    # ... while an older row that did not store a default (placement, target step, alpha), or stored its
    # outcome differently, pools with a newer row that did; the seed is not part of the configuration.
    old = {k: v for k, v in _soft(0.84, 1.93, seed=0).items() if k != "seed"}
    new = {**_soft(0.80, 1.97, seed=1), "placement": "mean", "target_step": None, "alpha": 0.66, "step_ms_median": 500}
    best, mean, r0 = report._best_config([old, new, unseen])
    assert len(best) == 2 and mean == pytest.approx(0.82) and r0 is old


RESULTS = SCRIPT.parent / "results" / "cifar10_tradeoff.jsonl"


def _argv(command: str) -> list[str]:
    """The script's arguments in a stored command (a GPU run appends a remark after two spaces)."""
    words = shlex.split(command.split("  (")[0])
    return words[next(i for i, w in enumerate(words) if w.endswith("cifar10_tradeoff.py")) + 1:]


def _what(r: dict):
    method = r.get("method", "softquant")
    if method == "softquant" or method.startswith("refined-"):
        return r["h"], r["w"]
    return f"k{r['k']}" if "k" in r else r.get("n_bits")


def test_every_stored_row_is_found_by_the_command_that_wrote_it(report, monkeypatch):
    # The resume lookups ("is this run done?", "which row is this control's source?") rebuild a row's
    # configuration from the arguments; on every committed result they must find exactly that row.
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    commanded = [r for r in rows if "command" in r]
    assert len(commanded) >= 100
    for r in commanded:
        args = report._parse(_argv(r["command"]))
        monkeypatch.setattr(report, "_device_name", lambda: r["device"])  # rows from a lent GPU among them
        fields = report._fields(args, report._method(r), _what(r))
        assert report._config_key(fields) == report._config_key(r), r["command"]
        assert report._finished([r], args, report._method(r), _what(r)), r["command"]
        assert not report._finished([{**r, "seed": args.seed + 1}], args, report._method(r), _what(r))
        if report._method(r).startswith("refined-"):
            sources = report._sources(rows, args, r["h"], r["w"])
            assert [s["acc"] for s in sources] == [r["source_acc"]], r["command"]


def test_a_row_stores_no_option_the_lookups_cannot_see(report):
    # What a run ran goes through _fields; anything else a run passes must be a measurement.
    with pytest.raises(ValueError, match=r"\['max_bits'\] describe the run.*_fields"):
        report._row(None, {}, None, None, {}, None, 0.0, acc_snapped=0.5, max_bits=2)


def test_no_two_configurations_of_the_results_file_read_alike(report):
    # The tables name a row by _label (method, point, epochs), its device and _config_text: two configurations
    # that ran differently (two lr, say) must not read as one, or a reader pools what the report keeps apart.
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    seen = {}
    for r in rows:
        text = (report._label(r, report.SHORT_NAMES), r["device"], report._config_text({**r, "seed": 0}))
        seen.setdefault(text, set()).add(report._config_key(r))
    clashes = {t: keys for t, keys in seen.items() if len(keys) > 1}
    assert not clashes, f"configurations that read alike: {clashes}"
    # And the lr names itself once it is not the default, on the rows that changed it.
    lr = [r for r in rows if r.get("lr") != 0.01]
    assert lr and all(", lr " in report._config_text(r) for r in lr)
    assert ", lr " not in report._config_text(_soft(0.8, 1.0))


@pytest.mark.slow
def test_reruns_skip_finished_runs_and_controls_take_their_own_source(tmp_path):
    # The script end to end on a synthetic CIFAR-10 archive: every method once, then the same command
    # again (all skipped, results untouched), then a new option (a new run) and a control of it.
    from tests.data.test_cifar10 import _make_archive

    archive = _make_archive(tmp_path / "data")
    out = tmp_path / "results" / "r.jsonl"
    base = [sys.executable, str(SCRIPT), "--pretrained", str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt"),
            "--archive", str(archive), "--out", str(out), "--resume-dir", str(tmp_path / "runs"),
            "--couple-epochs", "1", "--refine-epochs", "1"]
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}  # the decoded-archive cache

    def script(*flags, ok=True, max_bits="2", extra=()):
        budget = ["--max-bits", max_bits] if max_bits else []
        done = subprocess.run([*base, *budget, *extra, *flags], env=env, capture_output=True, text=True, timeout=600)
        assert (done.returncode == 0) == ok, done.stderr[-3000:]
        return done

    everything = ["--points", "1e-3:0.9", "--controls", "heq:1e-3:0.9", "--codebook-k", "3", "--fp-control"]
    everything += ["--dkm-bits", "2"] if importlib.util.find_spec("coremltools") else []
    script(*everything)
    first = out.read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    dkm = ["dkm"] if "--dkm-bits" in everything else []
    assert [r["method"] for r in rows] == ["softquant", "codebook", *dkm, "refined-heq", "fp-finetuned"]
    two_bit_control = rows[-2]
    assert not list((tmp_path / "runs").iterdir())  # each finished run's resume checkpoint is removed
    again = script(*everything)
    assert again.stdout.count("skip ") == len(rows) and out.read_text() == first
    # Ternary layers are a new run, and its control takes its K_l from it, not from the 2-bit run.
    coupled = tmp_path / "coupled"
    script("--points", "1e-3:0.9", "--controls", "heq:1e-3:0.9", max_bits=None,
           extra=["--max-clusters", "3", "--save-coupled", str(coupled)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ternary, control = rows[-2:]
    # --save-coupled wrote the weights the snap saw: a full ResNet-20 state_dict, not yet at 3 values a layer.
    (saved,) = coupled.iterdir()
    assert saved.name.startswith("softquant-0.001-0.9-seed0-") and saved.suffix == ".pt"
    state = torch.load(saved, weights_only=True)
    assert len(state) == 116 and torch.unique(state["layer2.0.conv2.weight"]).numel() > 3
    assert (ternary["method"], ternary["max_clusters"], control["method"], control["source_max_clusters"]) == (
        "softquant", 3, "refined-heq", 3)
    assert set(ternary["k_per_layer"].values()) == {3} and control["source_acc"] == ternary["acc"]
    assert max(control["distinct_per_layer"].values()) == 3 and max(two_bit_control["distinct_per_layer"].values()) == 4
    # With --reassign-from coupling_start the control gets its source row's own refinement: snapped at
    # the coupling's end (epoch 1) after a full-precision epoch, refined over the last one.
    script("--points", "1e-3:0.9", "--controls", "heq:1e-3:0.9", extra=["--reassign", "--reassign-from", "coupling_start"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    spread, late = rows[-2:]
    assert (spread["method"], spread["reassign_from"], late["method"], late["reassign_from"]) == (
        "softquant", "coupling_start", "refined-heq", "coupling_start")
    assert late["source_acc"] == spread["acc"] and late["acc_snapped"] is not None
    assert max(late["distinct_per_layer"].values()) == 4 and late["bits_weighted"] == pytest.approx(spread["bits_weighted"])
    # A control whose soft quantization row was never run says so instead of borrowing another's K_l.
    missing = script("--alpha", "0.9", "--controls", "heq:1e-3:0.9", ok=False)
    assert "no soft quantization row h=0.001 w=0.9" in missing.stderr and "run --points 0.001:0.9 first" in missing.stderr
    assert len(out.read_text().splitlines()) == len(rows)


@pytest.mark.slow
def test_the_gpu_script_gathers_finished_rows_and_packs_a_run_cut_by_its_deadline(report, tmp_path, monkeypatch):
    # experiments/cifar10_tradeoff_gpu.sh on the CPU (LIMIT batches an epoch) with a job file: one job
    # (a point and its control) finishes, one (far too many epochs) is stopped at DEADLINE; the finished
    # rows are gathered, the cut run's checkpoint packed, and a later call of the script finds the
    # unpacked run again (written with the absolute checkpoint path, looked up with the relative one).
    from tests.data.test_cifar10 import _make_archive

    archive = _make_archive(tmp_path / "data")
    (tmp_path / "jobs.txt").write_text("# name flags\na --points 1e-3:0.9 --max-bits 2 --controls heq:1e-3:0.9\n"
                                       "b --fp-control --couple-epochs 100000\n")
    out = tmp_path / "out"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PY": sys.executable, "ARCHIVE": str(archive), "COUPLE": "1",
           "REFINE": "1", "LIMIT": "2", "THREADS": "1", "DEADLINE": "45", "OUTDIR": str(out), "JOBFILE": str(tmp_path / "jobs.txt")}
    done = subprocess.run(["bash", str(SCRIPT.with_name("cifar10_tradeoff_gpu.sh"))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "rows finished: 2" in done.stdout, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["softquant", "refined-heq"] and rows[1]["source_acc"] == rows[0]["acc"]
    assert all(r["couple_epochs"] == 1 and r["limit_train_batches"] == 2 for r in rows)
    logs = (out / "logs.txt").read_text()
    assert "=== a: --points 1e-3:0.9" in logs and "=== b: --fp-control" in logs and "epoch 2/100001" in logs
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(out / "unfinished.tgz"), "-C", str(unpacked)], check=True)
    (cut,) = (unpacked / "b" / "runs").iterdir()  # only the cut run: a's finished runs left nothing
    assert not (unpacked / "a").exists() and torch.load(cut / "last.ckpt", weights_only=False)["epoch"] >= 1
    monkeypatch.chdir(SCRIPT.parent.parent)
    argv = ["--pretrained", "experiments/checkpoints/resnet20_cifar10_fp.ckpt", "--schedule", "cosine", "--couple-epochs", "1",
            "--refine-epochs", "1", "--limit", "2", "--archive", str(archive), "--ramp-steps", "391", "--fp-control",
            "--couple-epochs", "100000", "--resume-dir", str(unpacked / "b" / "runs")]
    assert report._run_dir(report._parse(argv), "fp-finetuned", None) == cut


def test_coupled_weights_of_two_configurations_get_two_files(report, tmp_path):
    # The same point with another budget is another run: its --save-coupled file must not replace the first.
    ckpt = str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt")
    argv = ["--pretrained", ckpt, "--points", "1e-3:0.9", "--save-coupled", str(tmp_path)]
    two_bit, ternary = report._parse([*argv, "--max-bits", "2"]), report._parse([*argv, "--max-clusters", "3"])
    paths = [report._saver(a, "softquant", (1e-3, 0.9))[0].path for a in (two_bit, ternary)]
    assert paths[0] != paths[1] and all(p.parent == tmp_path and p.name.startswith("softquant-0.001-0.9-seed0-")
                                        for p in paths)
    assert report._saver(report._parse([*argv, "--max-bits", "2"]), "softquant", (1e-3, 0.9))[0].path == paths[0]
    assert report._saver(report._parse(argv[:4]), "softquant", (1e-3, 0.9)) == []


@pytest.mark.parametrize("flag, spec, form", [("--points", "1e-3", "h:w"), ("--points", "x:0.9", "h:w"),
                                              ("--controls", "1e-3:0.9", "Q:h:w"), ("--controls", "heq:0:0.9", "Q:h:w")])
def test_a_malformed_point_is_refused_with_its_form(report, capsys, flag, spec, form):
    with pytest.raises(SystemExit):
        report._parse(["--pretrained", "fp.ckpt", flag, spec])
    assert f"{flag}: {spec!r} is not {form} with positive numbers" in capsys.readouterr().err


def test_latent_start_is_its_own_configuration_and_needs_reassign(report, monkeypatch, capsys):
    ckpt = str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt")
    argv = ["--pretrained", ckpt, "--points", "5e-3:0.9", "--max-clusters", "3", "--reassign"]
    snap, spread = report._parse(argv), report._parse([*argv, "--reassign-from", "coupling_start"])
    fields = [report._fields(a, "softquant", (5e-3, 0.9)) for a in (snap, spread)]
    assert "reassign_from" not in fields[0] and fields[1]["reassign_from"] == "coupling_start"
    assert report._config_key(fields[0]) != report._config_key(fields[1])
    # Method B takes the option too, and tells it apart the same way.
    codebook = [report._fields(report._parse(["--pretrained", ckpt, *x]), "codebook", "k3") for x in
                (["--codebook-k", "3", "--reassign"], ["--codebook-k", "3", "--reassign", "--reassign-from", "coupling_start"])]
    assert "reassign_from" not in codebook[0] and codebook[1]["reassign_from"] == "coupling_start"
    assert report._config_key(codebook[0]) != report._config_key(codebook[1])
    # A control takes it too: the source row's own refinement, another configuration than the plain control.
    controls = [report._fields(report._parse([*argv, *x]), "refined-heq", (5e-3, 0.9)) for x in ([], ["--reassign-from", "coupling_start"])]
    assert "reassign_from" not in controls[0] and controls[1]["reassign_from"] == "coupling_start"
    assert report._config_key(controls[0]) != report._config_key(controls[1])
    for extra in (["--points", "5e-3:0.9"], ["--controls", "heq:5e-3:0.9", "--reassign", "--couple-epochs", "0"]):
        monkeypatch.setattr(sys, "argv", ["cifar10_tradeoff.py", *argv[:2], *extra, "--reassign-from", "coupling_start"])
        with pytest.raises(SystemExit, match="needs --reassign, --couple-epochs >= 1 and --points, --codebook-bits"):
            report.main()


def test_latent_start_rows_pair_with_the_heq_controls_of_their_plain_configuration(report):
    plain = [{**_soft(0.66, 1.01, seed=0), "reassign": True}, {**_soft(0.71, 1.01, seed=1), "reassign": True}]
    other = {**_soft(0.70, 1.01, seed=0), "reassign": True, "max_bits": 2}  # another configuration, another source
    spread = [{**_soft(0.813, 1.01, seed=s), "reassign": True, "reassign_from": "coupling_start"} for s in (0, 1, 2)]
    spread[1]["acc"] = 0.804
    spread[1]["device"] = "cuda (NVIDIA H200)"  # a GPU run still pairs with the CPU control of its seed

    def control(acc, seed, source):
        return {"method": "refined-heq", "h": 5e-3, "w": 0.9, "seed": seed, "acc": acc, "source_acc": source,
                "bits_weighted": 1.01, "device": "cpu"}

    controls = [control(0.8044, 0, 0.66), control(0.8062, 1, 0.66), control(0.79, 1, 0.70),
                {**control(0.9, 0, 0.66), "method": "refined-kmeans"}]
    # Controls given the option's own refinement take their K_l from its seed-0 row: paired apart.
    own = [{**control(0.8101, 0, 0.813), "reassign_from": "coupling_start"},
           {**control(0.8202, 2, 0.813), "reassign_from": "coupling_start"},
           {**control(0.83, 1, 0.66), "reassign_from": "coupling_start"}]  # its source is no option row
    pairs = report._same_seed_pairs([*plain, other, *spread], controls + own)
    # Seed 0 and 1 find the HEQ control of the plain configuration's seed-0 source; seed 2 has none.
    assert pairs == [(1.01, 0.813, 0.8044, ""), (1.01, 0.804, 0.8062, "cuda (NVIDIA H200) vs cpu")]
    assert report._same_seed_pairs([*plain, other, *spread], controls + own, own_refinement=True) == [
        (1.01, 0.813, 0.8101, ""), (1.01, 0.813, 0.8202, "")]


def test_a_control_takes_its_source_from_its_own_device_first_then_from_another(report, monkeypatch):
    ckpt = str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt")
    args = report._parse(["--pretrained", ckpt, "--max-bits", "1", "--edge-bits", "4", "--reassign"])
    monkeypatch.setattr(report, "_device_name", lambda: "cuda")
    gpu = {**report._fields(args, "softquant", (1e-3, 0.9)), "seed": 0, "acc": 0.76}
    monkeypatch.setattr(report, "_device_name", lambda: "cpu")
    cpu = {**report._fields(args, "softquant", (1e-3, 0.9)), "seed": 0, "acc": 0.75}
    other = {**cpu, "max_bits": 2, "acc": 0.8}  # another configuration is never a source
    assert [r["acc"] for r in report._sources([gpu, other], args, 1e-3, 0.9)] == [0.76]  # a lent GPU's row serves
    assert [r["acc"] for r in report._sources([gpu, cpu, other], args, 1e-3, 0.9)] == [0.75]  # this device's first
    assert report._sources([{**gpu, "seed": 1}, other], args, 1e-3, 0.9) == []  # seed 0 only


def test_a_run_resumes_whether_its_checkpoint_path_was_written_relative_or_absolute(report, monkeypatch, tmp_path):
    monkeypatch.chdir(SCRIPT.parent.parent)
    relative = "experiments/checkpoints/resnet20_cifar10_fp.ckpt"
    flags = ["--points", "1e-3:0.9", "--max-bits", "1", "--resume-dir", str(tmp_path / "runs")]
    first = report._run_dir(report._parse(["--pretrained", relative, *flags]), "softquant", "1e-3:0.9")
    again = report._run_dir(report._parse(["--pretrained", str(Path(relative).resolve()), *flags]), "softquant", "1e-3:0.9")
    assert again == first and len(list((tmp_path / "runs").iterdir())) == 1
    (tmp_path / "other.ckpt").write_bytes(b"")  # another checkpoint is another run
    other = report._run_dir(report._parse(["--pretrained", str(tmp_path / "other.ckpt"), *flags]), "softquant", "1e-3:0.9")
    assert other != first and len(list((tmp_path / "runs").iterdir())) == 2


def test_the_same_epochs_reference_is_of_the_rows_device_first_then_of_another(report):
    def fp(acc, device, epochs=(16, 8), **extra):
        return {"method": "fp-finetuned", "couple_epochs": epochs[0], "refine_epochs": epochs[1], "schedule": "cosine",
                "lr": 0.01, "device": device, "acc": acc, **extra}

    gpu = {**_soft(0.82, 1.01, epochs=(16, 8)), "device": "cuda (NVIDIA H200)"}
    fps = [fp(0.86, "cpu"), fp(0.84, "cpu", epochs=(8, 4)), fp(0.9, "cpu", distill=1.0)]
    assert report._same_budget_fp(gpu, fps) == pytest.approx(0.86)  # 24 epochs on the CPU serve the GPU row
    assert report._same_budget_fp(gpu, [*fps, fp(0.85, "cuda (NVIDIA H200)")]) == pytest.approx(0.85)  # its own first
    assert report._same_budget_fp({**gpu, "couple_epochs": 32, "refine_epochs": 16}, fps) is None


def test_a_missing_entropy_coder_stops_the_run_before_any_training(report, monkeypatch, tmp_path):
    def missing():
        raise ImportError("coding='ans' needs the `constriction` package")

    def never(*args, **kwargs):
        raise AssertionError("trained although the row could not be written")

    monkeypatch.setattr(report, "entropy_coder", missing)
    monkeypatch.setattr(report, "run_point", never)
    ckpt = str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt")
    monkeypatch.setattr(sys, "argv", ["cifar10_tradeoff.py", "--pretrained", ckpt, "--points", "5e-3:0.9",
                                      "--out", str(tmp_path / "rows.jsonl"), "--resume-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match="constriction"):
        report.main()
    assert not (tmp_path / "rows.jsonl").exists()


def test_the_committed_report_is_the_one_its_results_file_generates_now(report, tmp_path):
    # A long run writes the report with the code it started with: a label fixed meanwhile (the lr of
    # _config_text) stays wrong in the committed file until the report is generated again.
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    report.write_reports(rows, tmp_path)
    committed = (RESULTS.parent / "cifar10_tradeoff.md").read_text()
    assert (tmp_path / "cifar10_tradeoff.md").read_text() == committed, (
        "experiments/results/cifar10_tradeoff.md is stale: run "
        "`python experiments/cifar10_tradeoff.py --report-only --pretrained x`")


def test_full_precision_epochs_before_the_coupling_are_their_own_configuration(report, monkeypatch, capsys):
    ckpt = str(SCRIPT.parent / "checkpoints" / "resnet20_cifar10_fp.ckpt")
    argv = ["--pretrained", ckpt, "--points", "1e-3:0.9", "--couple-epochs", "32", "--refine-epochs", "16", "--max-bits", "1",
            "--reassign", "--reassign-from", "coupling_start"]
    plain, late = report._parse(argv), report._parse([*argv, "--couple-from", "24"])
    fields = [report._fields(a, "softquant", (1e-3, 0.9)) for a in (plain, late)]
    assert "couple_from" not in fields[0] and fields[1]["couple_from"] == 24
    assert report._config_key(fields[0]) != report._config_key(fields[1])
    assert "full precision for 24 epochs before the coupling" in report._config_text(fields[1])
    # Runs started before the option existed keep their resume directory; the new ones get another.
    assert "couple_from" not in report._what(plain, "softquant", "1e-3:0.9")
    assert report._run_hash(plain, "softquant", "1e-3:0.9") != report._run_hash(late, "softquant", "1e-3:0.9")

    # The coupling callback of the run gets the window [E, couple_epochs).
    class Built(Exception):
        pass

    seen = {}

    def soft(**kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(report, "SoftQuantCallback", soft)
    with pytest.raises(Built):
        report.run_point(late, 1e-3, 0.9, dm=None)
    assert (seen["start_epoch"], seen["stop_epoch"]) == (24, 32)

    # An epoch outside the coupling, or a command that runs other methods too, is refused by name.
    for extra in (["--couple-from", "32"], ["--couple-from", "-1"], ["--couple-from", "8", "--dkm-bits", "1"],
                  ["--couple-from", "8", "--controls", "heq:1e-3:0.9"]):
        with pytest.raises(SystemExit):
            report._parse([*argv, *extra])
        assert "--couple-from" in capsys.readouterr().err
