"""Killed with SIGKILL and resumed through the command a user runs, a run ends as the
uninterrupted one: the same per-layer K_l, bit-identical weights and the same exported
file. Each scenario runs ``python -m sq_lightning fit --config ...`` in a fresh
interpreter, kills it once (``tests.kill.KillAtEpoch``: SIGKILL at the start of an epoch,
after the epoch before was checkpointed), and resumes with ``--ckpt_path .../last.ckpt``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.slow


def _fit(cwd: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(config),
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )


def _killed_and_resumed(cwd: Path, config: Path, kill_epoch: int, checkpoints: Path) -> None:
    kill = '{"class_path": "tests.kill.KillAtEpoch", "init_args": {"epoch": %d}}' % kill_epoch
    killed = _fit(cwd, config, f"--trainer.callbacks+={kill}")
    assert killed.returncode == -9, f"the run was not killed (rc {killed.returncode}):\n{killed.stderr[-3000:]}"
    last = cwd / checkpoints / "last.ckpt"
    assert last.is_file(), f"no last.ckpt to resume from in {cwd / checkpoints}"
    resumed = _fit(cwd, config, f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def _assert_same_run(ckpt_a: Path, ckpt_b: Path, export_a: Path, export_b: Path, quantized: list[str]) -> None:
    """The final checkpoints hold the same step and bit-identical weights, each quantized
    layer the same number of distinct values, and the exported files are the same bytes."""
    ca, cb = (torch.load(c, map_location="cpu", weights_only=False) for c in (ckpt_a, ckpt_b))
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    sa, sb = ca["state_dict"], cb["state_dict"]
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs after the resume"
    for key in quantized:
        # K_l read from the weights themselves: distinct values of the snapped layer.
        k_a, k_b = sa[key].unique().numel(), sb[key].unique().numel()
        assert k_a == k_b and k_a <= 64, (key, k_a, k_b)
    assert export_a.read_bytes() == export_b.read_bytes(), "the exported files differ"


QUICKSTART = REPO / "configs" / "quickstart_digits.yaml"
QUICK_CKPT = Path("runs/quickstart/version_0/checkpoints")  # the killed run's


@pytest.fixture(scope="module")
def quickstart_reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("uninterrupted")
    result = _fit(ref, QUICKSTART)
    assert result.returncode == 0, result.stderr[-3000:]
    return ref


@pytest.mark.parametrize("kill_epoch", [14, 20], ids=["during-coupling", "during-refinement"])
def test_quickstart_killed_and_resumed_equals_the_uninterrupted_run(quickstart_reference, tmp_path, kill_epoch):
    # The quickstart couples in epochs 10-17, snaps at 18 and refines in 18-21.
    _killed_and_resumed(tmp_path, QUICKSTART, kill_epoch, QUICK_CKPT)
    # The resumed run logs to the next version directory, its checkpoints and export in it.
    ref, run = quickstart_reference / "runs/quickstart/version_0", tmp_path / "runs/quickstart/version_1"
    _assert_same_run(ref / "checkpoints/last.ckpt", run / "checkpoints/last.ckpt", ref / "model.sq.safetensors",
                     run / "model.sq.safetensors", ["model.net.1.weight", "model.net.3.weight", "model.net.5.weight"])


CIFAR_CKPT = Path("runs/cifar10_resnet20/softquant/checkpoints")


def _short_cifar_config(directory: Path) -> Path:
    """The shipped stage-2 config cut to 512 training images and 4 epochs, with the snap and
    refinement of stage 3 added: coupling in epochs 0-1, snap at 2, refinement in 2-3."""
    cfg = yaml.safe_load((REPO / "configs" / "cifar10_resnet20_softquant.yaml").read_text())
    cfg["model"]["init_args"].update(init_from=None, lr=0.05)
    cfg["data"]["init_args"].update(archive=str(ARCHIVE), limit_train=512, batch_size=64)
    cfg["trainer"].update(max_epochs=4, limit_val_batches=2, log_every_n_steps=2)
    callbacks = cfg["trainer"]["callbacks"]
    soft = next(cb for cb in callbacks if cb["class_path"].endswith("SoftQuantCallback"))
    soft["init_args"].update(stop_epoch=2, log_every_n_steps=2)
    callbacks.append({
        "class_path": "sq_lightning.callbacks.ClusterRefine",
        "init_args": {"snap_epoch": 2, "w": soft["init_args"]["w"],
                      "snap": {"on_unclustered": "snap", "recalibrate_bn_batches": 4},
                      "export": {"path": "model.sq.safetensors", "coding": "ans"}},
    })
    path = directory / "cifar_short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cifar_reference(tmp_path_factory):
    if not ARCHIVE.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {ARCHIVE}")
    ref = tmp_path_factory.mktemp("cifar_uninterrupted")
    config = _short_cifar_config(ref)
    result = _fit(ref, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return ref, config


@pytest.mark.parametrize("kill_epoch", [1, 3], ids=["during-coupling", "during-refinement"])
def test_short_cifar10_run_killed_and_resumed_equals_the_uninterrupted_run(cifar_reference, tmp_path, kill_epoch):
    ref, config = cifar_reference
    _killed_and_resumed(tmp_path, config, kill_epoch, CIFAR_CKPT)
    state = torch.load(ref / CIFAR_CKPT / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4]
    # The config's checkpoint directory is fixed; the resumed run logs to the next version.
    logs = Path("runs/cifar10_resnet20/softquant")
    _assert_same_run(ref / CIFAR_CKPT / "last.ckpt", tmp_path / CIFAR_CKPT / "last.ckpt",
                     ref / logs / "version_0/model.sq.safetensors", tmp_path / logs / "version_1/model.sq.safetensors",
                     convs)
