"""Knowledge distillation in ImageClassifier (``distill_from``): the loss against a hand
computation, the teacher kept out of the trained model, and the errors."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from sq_lightning.callbacks import SoftQuantCallback
from sq_lightning.data import DigitsDataModule
from sq_lightning.models import ImageClassifier
from sq_lightning.models.classifier import build_model


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1, limit_train_batches=3,
                    limit_val_batches=0, num_sanity_val_steps=0)
    return Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A Lightning checkpoint of a digits MLP of another width than the default, trained 2 epochs."""
    tmp = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    model = ImageClassifier(arch="mlp", mlp_hidden=[32], lr=0.1, schedule="constant")
    trainer = _trainer(tmp, max_epochs=2, limit_train_batches=None)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp / "teacher.ckpt")
    return tmp / "teacher.ckpt", model.model.eval()


def _batch(n=48, seed=0):
    dm = DigitsDataModule(batch_size=n)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    return x, y


def test_teacher_built_from_its_checkpoint_architecture(teacher_ckpt):
    path, reference = teacher_ckpt
    student = ImageClassifier(arch="mlp", distill_from=str(path))  # default width [128, 64]
    teacher = student.load_teacher()
    x, _ = _batch()
    torch.testing.assert_close(teacher(x), reference(x), rtol=0, atol=0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Outside the module: no parameter, no state_dict key, nothing for an optimizer or callback.
    names = [n for n, _ in student.named_parameters()] + list(student.state_dict())
    assert names and all(n.startswith(("model.", "train_acc", "val_acc", "test_acc")) for n in names)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in student.model.parameters())


def test_training_loss_is_weighted_ce_plus_t2_kl(teacher_ckpt, tmp_path):
    """The loss of one training step against softmax/log by hand, with the weights before the step."""
    path, reference = teacher_ckpt
    torch.manual_seed(0)
    student = ImageClassifier(arch="mlp", lr=0.05, distill_from=str(path), distill_weight=0.3, distill_temperature=2.5)

    class Capture(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch, self.weights = batch, {k: v.clone() for k, v in pl_module.model.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"].detach()

    cap = Capture()
    trainer = _trainer(tmp_path, limit_train_batches=1, callbacks=[cap])
    trainer.fit(student, DigitsDataModule(batch_size=32))
    x, y = cap.batch
    net = build_model("mlp")
    net.load_state_dict(cap.weights)
    s = net(x).double()
    t = reference(x).double()
    T = 2.5
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    log_p_s = s / T - torch.log(torch.exp(s / T).sum(-1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean() * T * T
    ce = -(s - torch.log(torch.exp(s).sum(-1, keepdim=True))).gather(1, y[:, None]).mean()
    expected = 0.7 * ce + 0.3 * kl
    assert float(cap.loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(trainer.callback_metrics["train/distill_loss"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(trainer.callback_metrics["train/ce_loss"]) == pytest.approx(float(ce), rel=1e-5)


def test_distillation_pulls_the_student_to_the_teacher_and_leaves_the_teacher_alone(teacher_ckpt, tmp_path):
    """Soft targets only (weight 1, T 1), soft quantization on the student: after 3 epochs the
    student is much closer to the teacher than the same student trained on the labels; the
    teacher's weights and mode are untouched and the coupling saw the student's layers only."""
    path, reference = teacher_ckpt
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    x, _ = _batch(256)
    divergences = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        student = ImageClassifier(arch="mlp", lr=0.1, schedule="constant", distill_from=str(path),
                                  distill_weight=weight, distill_temperature=1.0)
        soft = SoftQuantCallback(h=1e-5, w=0.9)
        trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=None, callbacks=[soft])
        trainer.fit(student, DigitsDataModule(batch_size=32))
        with torch.no_grad():
            divergences[weight] = torch.nn.functional.kl_div(
                student(x).log_softmax(-1), reference(x).log_softmax(-1), reduction="batchmean", log_target=True
            ).item()
        assert set(soft.coupler.sigma) == {n for n, p in student.named_parameters() if p.dim() > 1}
        for k, v in student.teacher.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert not student.teacher.training
    assert divergences[1.0] < 0.5 * divergences[0.0], divergences


def test_distilled_checkpoint_reloads_without_the_teacher_file(teacher_ckpt, tmp_path):
    path, _ = teacher_ckpt
    copy = tmp_path / "teacher.ckpt"
    copy.write_bytes(path.read_bytes())
    student = ImageClassifier(arch="mlp", lr=0.05, distill_from=str(copy))
    trainer = _trainer(tmp_path, limit_train_batches=2)
    trainer.fit(student, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    copy.unlink()
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "student.ckpt")
    assert reloaded.teacher is None
    for k, v in reloaded.model.state_dict().items():
        torch.testing.assert_close(v, student.model.state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distill_weight": 1.5}, r"`distill_weight` must be in \[0, 1\], got 1.5\."),
        ({"distill_weight": -0.1}, r"`distill_weight` must be in \[0, 1\]"),
        ({"distill_temperature": 0.0}, r"`distill_temperature` must be > 0, got 0.0\."),
    ],
)
def test_bad_distill_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(arch="mlp", **kwargs)


def test_missing_teacher_file_raises_at_fit(tmp_path):
    student = ImageClassifier(arch="mlp", distill_from=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"`distill_from` checkpoint '.*nope.ckpt' does not exist"):
        _trainer(tmp_path).fit(student, DigitsDataModule(batch_size=32))


def test_teacher_with_other_classes_or_shapes_raises(teacher_ckpt, tmp_path):
    path, _ = teacher_ckpt
    with pytest.raises(RuntimeError, match=r"`distill_from` teacher .* predicts 10 classes, this model 5"):
        ImageClassifier(arch="mlp", num_classes=5, distill_from=str(path)).load_teacher()
    torch.save(build_model("mlp", mlp_hidden=[16]).state_dict(), tmp_path / "plain.pt")  # no saved architecture
    with pytest.raises(RuntimeError, match=r"`distill_from` checkpoint .*plain.pt' does not match .*Shape mismatches"):
        ImageClassifier(arch="mlp", distill_from=str(tmp_path / "plain.pt")).load_teacher()


def test_subclass_that_overrides_on_fit_start_still_distils(teacher_ckpt, tmp_path):
    path, _ = teacher_ckpt

    class Mine(ImageClassifier):
        def on_fit_start(self) -> None:  # no super(): the teacher is read at the first step instead
            pass

    student = Mine(arch="mlp", lr=0.05, distill_from=str(path))
    trainer = _trainer(tmp_path, limit_train_batches=1)
    trainer.fit(student, DigitsDataModule(batch_size=32))
    assert student.teacher is not None and "train/distill_loss" in trainer.callback_metrics
