import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sq_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/*.yaml"))


def test_configs_exist():
    assert CONFIGS, f"no YAML config found in {REPO / 'configs'}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config, tmp_path):
    # A fresh interpreter per config, as a user runs it; --print_config instantiates nothing.
    result = subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(config), "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = yaml.safe_load(result.stdout)
    assert parsed["model"]["class_path"] and parsed["data"]["class_path"]
    assert not list(tmp_path.iterdir()), "--print_config must not write files"


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    # main(args) parses `args`; pytest's own sys.argv would only trigger Lightning's warning.
    monkeypatch.setattr(sys, "argv", ["sq-lightning"])


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fit_then_test_writes_tensorboard_events(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [
        "--seed_everything=0",
        "--model=sq_lightning.models.ImageClassifier",
        "--model.arch=mlp",
        "--model.in_features=64",
        "--model.lr=0.05",
        "--data=sq_lightning.data.DigitsDataModule",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=5",
    ]
    assert main(["fit", *common, "--trainer.max_epochs=1"]) is None

    # No logger configured: the CLI's default, TensorBoard under runs/.
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
    scalars = _scalars(run)
    assert {"val/acc", "val/loss", "train/loss", "train/acc"} <= set(scalars)
    assert len(scalars["val/acc"]) == 1
    assert 0.5 < scalars["val/acc"][0] <= 1.0  # one epoch of SGD learns the digits well past chance (0.1)
    assert len(scalars["train/loss"]) == 4  # 23 steps, logged every 5

    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    main(["test", *common, f"--ckpt_path={ckpt}"])
    test_scalars = _scalars(tmp_path / "runs" / "lightning_logs" / "version_1")
    # Same weights, same images (the digits module tests on its validation part).
    assert test_scalars["test/acc"][0] == pytest.approx(scalars["val/acc"][0])


def test_bad_argument_exits_with_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model=sq_lightning.models.ImageClassifier", "--model.lr=fast",
              "--data=sq_lightning.data.DigitsDataModule"])
    assert info.value.code != 0
    assert "lr" in capsys.readouterr().err


OVERLAYS = sorted(REPO.glob("configs/overlays/*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[c.name for c in OVERLAYS])
def test_overlay_composes_with_its_base_config(overlay, tmp_path):
    """Overlays change a base config (one extra `--config`), the config whose name starts
    theirs: they parse composed with it."""
    base = max((c for c in CONFIGS if overlay.stem.startswith(c.stem)), key=lambda c: len(c.stem))
    result = subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(base),
         "--config", str(overlay), "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = yaml.safe_load(result.stdout)["trainer"]["callbacks"]
    # The overlay's callback list replaces the quickstart's, with every value it sets.
    wanted = yaml.safe_load(overlay.read_text())["trainer"]["callbacks"]
    assert [cb["class_path"] for cb in parsed] == [cb["class_path"] for cb in wanted]
    for got, want in zip(parsed, wanted):
        for key, value in want.get("init_args", {}).items():
            if isinstance(value, dict):  # a settings group: printed with every field, the overlay's among them
                assert {k: got["init_args"][key][k] for k in value} == value, (want["class_path"], key)
            else:
                assert got["init_args"][key] == value, (want["class_path"], key)


def test_a_key_of_an_earlier_version_names_its_new_place(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text((REPO / "configs/quickstart_digits.yaml").read_text().replace(
        "        snap:\n", "        export_path: model.sq.safetensors\n        refine: false\n        snap:\n"))
    result = subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(old), "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "`export_path` is now `export=ExportConfig(path=...)` (YAML: `export: {path: ...}`)" in result.stderr
    assert "`refine: false` is now `refine: null`" in result.stderr


def test_unknown_config_key_is_rejected_with_its_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "configs/quickstart_digits.yaml").read_text().replace("grad_ratio: 3.0", "grad_ratio: 3.0\n        hh: 1.0")
    )
    result = subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(bad), "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "hh" in result.stderr


@pytest.mark.slow
def test_cifar10_stage_runs_a_few_batches_on_the_offline_copy(tmp_path, monkeypatch):
    """Stage 2 as a user runs it, on the real offline archive, cut to a few batches."""
    archive = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {archive}")
    monkeypatch.chdir(tmp_path)
    main([
        "fit",
        "--config", str(REPO / "configs/cifar10_resnet20_softquant.yaml"),
        "--model.init_args.init_from=null",
        f"--data.init_args.archive={archive}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ])
    logs = list((tmp_path / "runs" / "cifar10_resnet20" / "softquant").glob("version_*"))
    assert logs, "no TensorBoard run written"
    scalars = _scalars(logs[0])
    assert "sq/coupling_loss" in scalars and "val/acc" in scalars


@pytest.mark.slow
def test_shakespeare_quickstart_through_the_cli_clusters_every_selected_layer(tmp_path):
    """The smallest Tiny Shakespeare configuration, end to end through `lightning fit --config`
    on the real corpus: every attention and MLP weight clusters, TensorBoard holds its bits,
    and the weights hold exactly the logged number of values."""
    import torch

    corpus = REPO.parent / "shared" / "datasets" / "tinyshakespeare.txt"
    if not corpus.exists():
        pytest.skip(f"Tiny Shakespeare not found at {corpus}")
    result = subprocess.run(
        [sys.executable, "-m", "sq_lightning", "fit", "--config", str(REPO / "configs/shakespeare_gpt_quickstart.yaml"),
         f"--data.init_args.path={corpus}", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "shakespeare_gpt_quickstart" / "version_0"
    scalars = _scalars(run)
    layers = [f"model.blocks.{b}.{m}.weight" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    bits = {tag.split("/", 2)[2]: values[-1] for tag, values in scalars.items() if tag.startswith("sq/bits/")}
    assert sorted(bits) == sorted(layers)  # the head is excluded, the embeddings are not Linear
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name in layers:
        k = scalars[f"sq/clusters/{name}"][-1]
        assert 2 <= k <= 32 and bits[name] == pytest.approx(math.log2(k), abs=1e-4), (name, k, bits[name])
        assert state[name].unique().numel() == k, name
    assert scalars["sq/bits_weighted"][-1] <= 5
    val = scalars["val/loss"]
    assert val[-1] < min(val[0], 2.4)  # uniform guessing: ln 65 = 4.17 nats
    assert (run / "model.sq.safetensors").is_file()
