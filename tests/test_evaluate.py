import lightning.pytorch as pl
import pytest
import torch

from sq_lightning.config import SnapConfig
from sq_lightning.data import DigitsDataModule
from sq_lightning.evaluate import clusters_per_layer, evaluate_baselines, main, quantize_model
from sq_lightning.models import ImageClassifier
from sq_lightning.snapper import ClusterSnapper
from tests.helpers import trainer


def test_quantize_model_hits_each_layers_k_and_leaves_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    ks = {"0.weight": 3, "2.weight": 5}
    for method in ("heq", "kmeans", "uniform"):
        q = quantize_model(model, ks, method)
        assert clusters_per_layer(q) == ks
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="names layers the model does not have"):
        quantize_model(model, {"9.weight": 2}, "heq")


def test_command_prints_a_table_for_two_checkpoints(tmp_path, capsys):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = ImageClassifier(arch="mlp", in_features=64, mlp_hidden=[32], lr=0.05, schedule="constant")
    t = trainer(max_epochs=3)
    t.fit(module, datamodule=dm)
    t.save_checkpoint(tmp_path / "fp.ckpt")
    ClusterSnapper(snap=SnapConfig(on_unclustered="snap")).snap(module.model)
    t.save_checkpoint(tmp_path / "q.ckpt")
    rows = main(["--reference", str(tmp_path / "fp.ckpt"), "--quantized", str(tmp_path / "q.ckpt"), "--data", "digits"])
    out = capsys.readouterr().out
    assert "heq (post-training)" in out and "kmeans (post-training)" in out and "K_l per layer" in out
    by = {r["method"]: r["acc"] for r in rows}
    assert by["full precision"] > 0.8
    # Optimal k-means minimises the squared error at the same K: never far below HEQ.
    assert by["kmeans (post-training)"] >= by["heq (post-training)"] - 0.05
