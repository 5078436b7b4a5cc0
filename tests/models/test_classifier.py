import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from sq_lightning.data import DigitsDataModule
from sq_lightning.models import ImageClassifier, lr_factor, resnet20


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    """A real Lightning checkpoint of a digits MLP after a few SGD steps."""
    tmp = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    model = ImageClassifier(arch="mlp", in_features=64, lr=0.05)
    trainer = _trainer(tmp)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = tmp / "stage1.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.model.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1}, r"`lr` must be > 0, got -1\."),
        ({"lr": 0.0}, r"`lr` must be > 0, got 0.0\."),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\), got 1.0\."),
        ({"weight_decay": -1e-4}, r"`weight_decay` must be >= 0, got -0.0001\."),
        ({"arch": "vgg11"}, r"`arch` must be one of \['resnet20', 'resnet32', 'resnet44', 'resnet56', 'mlp'\]"),
        ({"num_classes": 1}, r"`num_classes` must be >= 2, got 1\."),
        ({"nesterov": True, "momentum": 0.0}, r"`nesterov=True` needs `momentum` > 0"),
        ({"schedule": "linear"}, r"`schedule` must be one of \['cosine', 'step', 'constant'\], got 'linear'"),
        ({"milestones": [0.75, 0.5]}, r"`milestones` must be increasing fractions .* got \[0.75, 0.5\]"),
        ({"milestones": [30]}, r"`milestones` must be increasing fractions"),
        ({"gamma": 0.0}, r"`gamma` must be in \(0, 1\], got 0.0\."),
        ({"warmup_epochs": -1}, r"`warmup_epochs` must be >= 0, got -1\."),
        ({"schedule": "step", "restarts": [4]}, r"`restarts` applies to `schedule='cosine'` only"),
        ({"restarts": [4, 4]}, r"`restarts` must be increasing whole epochs"),
        ({"warmup_epochs": 2, "restarts": [2]}, r"`restarts` must be increasing whole epochs after the warm-up"),
    ],
)
def test_bad_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


def test_lr_factor_cosine():
    assert lr_factor(0, "cosine", 30) == 1.0
    assert lr_factor(15, "cosine", 30) == pytest.approx(0.5)
    assert lr_factor(29, "cosine", 30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_lr_factor_step_milestones_are_fractions_of_max_epochs():
    factors = [lr_factor(e, "step", 40, milestones=(0.5, 0.75), gamma=0.1) for e in range(40)]
    assert factors[:20] == [1.0] * 20
    assert factors[20:30] == pytest.approx([0.1] * 10)
    assert factors[30:] == pytest.approx([0.01] * 10)


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(e, "cosine", 12, warmup_epochs=2) for e in range(12)]
    assert f[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert f[7] == pytest.approx(0.5)  # halfway through the 10 cosine epochs
    assert lr_factor(3, "constant", 10, warmup_epochs=4) == pytest.approx(1.0)


def test_lr_factor_cosine_restarts():
    # 10 epochs, restarts at 4 and 7: cycles of 4, 3 and 3 epochs, each from 1 towards 0.
    f = [lr_factor(e, "cosine", 10, restarts=(4, 7)) for e in range(10)]
    expect = [0.5 * (1 + math.cos(math.pi * t / n)) for n in (4, 3, 3) for t in range(n)]
    assert f == pytest.approx(expect)
    assert f[4] == f[7] == 1.0
    # with a warm-up the first cycle starts after it
    g = [lr_factor(e, "cosine", 8, warmup_epochs=2, restarts=(5,)) for e in range(8)]
    assert g == pytest.approx([0.5, 1.0, *(0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(3)),
                               *(0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(3))])


def test_scheduler_restarts_at_the_given_epoch(tmp_path):
    model = ImageClassifier(arch="mlp", lr=0.1, restarts=[3])
    model.trainer = _trainer(tmp_path, max_epochs=5)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.075, 0.025, 0.1, 0.05])
    late = ImageClassifier(arch="mlp", restarts=[5])
    late.trainer = _trainer(tmp_path, max_epochs=5)
    with pytest.raises(ValueError, match=r"`restarts` must be < `trainer.max_epochs` \(5\), got \[5\]"):
        late.configure_optimizers()


def test_scheduler_follows_trainer_max_epochs(tmp_path):
    model = ImageClassifier(arch="mlp", lr=0.2, schedule="step", milestones=[0.5], gamma=0.5)
    model.trainer = _trainer(tmp_path, max_epochs=4)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1])
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4


def test_cosine_without_max_epochs_raises(tmp_path):
    model = ImageClassifier(arch="mlp")
    model.trainer = _trainer(tmp_path, max_epochs=-1, max_steps=10)
    with pytest.raises(ValueError, match=r"computed per epoch from `trainer.max_epochs`, got max_epochs=-1"):
        model.configure_optimizers()


def test_fit_logs_metrics(tmp_path):
    model = ImageClassifier(arch="mlp", lr=0.05)
    trainer = _trainer(tmp_path, limit_train_batches=5)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    logged = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(logged)
    assert 0.0 <= float(logged["val/acc"]) <= 1.0
    trainer.test(model, DigitsDataModule(batch_size=32), verbose=False)
    assert {"test/loss", "test/acc"} <= set(trainer.callback_metrics)


def test_val_acc_is_top1_over_samples(tmp_path):
    # A model that always answers class 3, on 30 threes and 10 zeros: top-1 accuracy over
    # samples (micro) is 0.75; MulticlassAccuracy's default (macro, mean recall) is not.
    model = ImageClassifier(arch="mlp", lr=0.05)
    with torch.no_grad():
        last = model.model.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[3] = 10.0
    labels = torch.tensor([3] * 30 + [0] * 10)
    loader = DataLoader(TensorDataset(torch.randn(40, 64), labels), batch_size=16)
    trainer = _trainer(tmp_path, limit_val_batches=None)
    trainer.validate(model, loader, verbose=False)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(0.75)
    expected_loss = torch.nn.functional.cross_entropy(model(torch.zeros(1, 64)).expand(40, -1), labels)
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(expected_loss.item(), rel=1e-5)


def test_init_from_round_trip(stage1_ckpt):
    path, weights = stage1_ckpt
    model = ImageClassifier(arch="mlp", init_from=str(path))
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_init_from_plain_state_dict(tmp_path):
    net = resnet20()
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    model = ImageClassifier(arch="resnet20", init_from=str(tmp_path / "weights.pt"))
    torch.testing.assert_close(model.model.conv1.weight, net.conv1.weight, rtol=0, atol=0)


def test_init_from_shape_mismatch_names_keys_and_leaves_model_untouched(stage1_ckpt):
    path, _ = stage1_ckpt
    model = ImageClassifier(arch="mlp", mlp_hidden=[32])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        model.load_init_weights(str(path))
    message = str(info.value)
    assert "trained with mlp_hidden=[128, 64]; this model has mlp_hidden=[32]" in message
    assert "net.1.weight: checkpoint (128, 64) vs model (32, 64)" in message
    assert "Unexpected in checkpoint: net.5.weight, net.5.bias" in message
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_init_from_other_architecture_lists_missing_keys(tmp_path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in resnet20().state_dict().items()},
                "hyper_parameters": {"arch": "resnet20"}}, tmp_path / "r20.ckpt")
    with pytest.raises(RuntimeError, match=r"trained with arch='resnet20'; this model has arch='resnet32'.*"
                       r"Missing in checkpoint: layer1\.3\.conv1\.weight"):
        ImageClassifier(arch="resnet32", init_from=str(tmp_path / "r20.ckpt"))


def test_init_from_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`init_from` checkpoint '.*nope.ckpt' does not exist"):
        ImageClassifier(arch="mlp", init_from=str(tmp_path / "nope.ckpt"))


def test_init_from_unreadable_file_raises(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"`init_from` checkpoint '.*junk.ckpt' could not be read"):
        ImageClassifier(arch="mlp", init_from=str(tmp_path / "junk.ckpt"))


def test_stage2_checkpoint_reloads_without_stage1_file(stage1_ckpt, tmp_path):
    path, _ = stage1_ckpt
    stage1 = tmp_path / "copy.ckpt"
    stage1.write_bytes(path.read_bytes())
    model = ImageClassifier(arch="mlp", lr=0.01, init_from=str(stage1))
    trainer = _trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    stage1.unlink()
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "stage2.ckpt")
    for key, value in reloaded.model.state_dict().items():
        torch.testing.assert_close(value, model.model.state_dict()[key], rtol=0, atol=0)
    saved = torch.load(tmp_path / "stage2.ckpt", weights_only=True)
    assert saved["sq_lightning_init_from"] == str(stage1)
    assert model.hparams.init_from == str(stage1)  # the live module keeps its own record


def test_predict_returns_probabilities():
    model = ImageClassifier(arch="mlp").eval()
    probs = model.predict_step((torch.randn(4, 64), torch.zeros(4, dtype=torch.long)), 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
