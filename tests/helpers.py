"""A tiny real model on real data (scikit-learn's 8x8 digits) for callback tests."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(batch_size=64, n_train=1400, shuffle=True):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:n_train], perm[n_train:]
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[va], y[va]), batch_size=256)
    return train, val


class TinyNet(pl.LightningModule):
    def __init__(self, hidden=64, lr=0.05, momentum=0.9, bn=False, weight_decay=0.0):
        super().__init__()
        layers = [nn.Linear(64, hidden)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 10)]
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
        total = sum(len(y) for _, y in loader)
    model.train()
    return correct / total


def trainer(**kw):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name):
    """The script ``experiments/<name>.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
