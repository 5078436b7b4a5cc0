"""The README's Python examples run as written (with a small model and data supplied)."""

import re
from pathlib import Path

import lightning.pytorch as pl
import torch

from sq_lightning import load_compressed
from sq_lightning.data import DigitsDataModule
from sq_lightning.models import ImageClassifier
from tests.helpers import digits_loaders

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks()
    assert len(blocks) == 3, "update this test when README's examples change"
    pl.seed_everything(0)
    # Pretrain first, as the README advises, so the coupling fine-tunes a trained model.
    model = ImageClassifier(arch="mlp", in_features=64, mlp_hidden=[64, 32], lr=0.05, schedule="constant")
    datamodule = DigitsDataModule(batch_size=64)
    pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(model, datamodule)
    ns = {"model": model, "datamodule": datamodule}
    exec(compile(blocks[0].replace("max_epochs=12", "max_epochs=12, enable_progress_bar=False"), "README-1", "exec"), ns)
    refine = ns["trainer"].callbacks[1]
    assert refine.snapped and all(r.snapped for r in refine.snapper.reports.values())

    train, _ = digits_loaders()
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    ns2 = {
        "model": net,
        "loader": train,
        "loss_fn": torch.nn.functional.cross_entropy,
        "optimizer": torch.optim.SGD(net.parameters(), lr=0.05),
    }
    exec(compile(blocks[1], "README-2", "exec"), ns2)
    assert ns2["snapper"].reports

    ns["refine"] = refine
    exec(compile(blocks[2], "README-3", "exec"), ns)
    assert (tmp_path / "model.sq.safetensors").exists()
    assert ns["report"].layers and all(layer.coding == "packed" for layer in ns["report"].layers.values())
    state = load_compressed(tmp_path / "model.ans.safetensors")
    for name, param in ns["model"].state_dict().items():
        assert torch.equal(state[name], param), name  # the entropy-coded file holds the same model
    assert ns["report"].compression_ratio > 4
