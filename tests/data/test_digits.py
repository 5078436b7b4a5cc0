import pytest
import torch

from sq_lightning.data import DigitsDataModule


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_split_sizes_and_stratification():
    dm = _setup(val_fraction=0.2)
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert n_train + n_val == 1797
    assert n_val == 360  # ceil(0.2 * 1797)
    counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about 36 of each digit


def test_split_is_deterministic_and_seeded():
    a, b, c = _setup(seed=0), _setup(seed=0), _setup(seed=1)
    torch.testing.assert_close(a.val_set.tensors[0], b.val_set.tensors[0], rtol=0, atol=0)
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])


def test_train_and_val_partition_the_data_set():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    raw = torch.as_tensor(x)
    # The same stratified split, and standardisation with training statistics only.
    idx_train, idx_val = train_test_split(range(len(x)), test_size=0.2, random_state=3, stratify=y)
    assert not set(idx_train) & set(idx_val) and len(idx_train) + len(idx_val) == len(x)
    mean, std = raw[idx_train].mean(0), raw[idx_train].std(0, unbiased=False)
    std[std == 0] = 1
    dm = _setup(seed=3)
    torch.testing.assert_close(dm.train_set.tensors[0].double(), (raw[idx_train] - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm.val_set.tensors[0].double(), (raw[idx_val] - mean) / std, rtol=1e-5, atol=1e-5)
    assert torch.equal(dm.val_set.tensors[1], torch.as_tensor(y[idx_val]))


def test_training_features_are_standardised():
    x = _setup().train_set.tensors[0]
    varying = x.std(0) > 0
    assert varying.sum() >= 60  # a few border pixels are always blank
    torch.testing.assert_close(x.mean(0), torch.zeros(64), rtol=0, atol=1e-5)
    torch.testing.assert_close(x[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum())), rtol=0,
                               atol=1e-4)


def test_image_layout_matches_flat_layout():
    flat, img = _setup(flatten=True), _setup(flatten=False)
    assert img.train_set.tensors[0].shape[1:] == (1, 8, 8)
    torch.testing.assert_close(img.train_set.tensors[0].flatten(1), flat.train_set.tensors[0], rtol=0, atol=0)


def test_loaders_are_deterministic():
    a, b = _setup(batch_size=16), _setup(batch_size=16)
    ya = next(iter(a.train_dataloader()))[1]
    assert torch.equal(ya, next(iter(b.train_dataloader()))[1])
    x, y = next(iter(a.val_dataloader()))
    assert x.shape == (16, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, a.val_set.tensors[1][:16])  # validation is not shuffled


def test_loader_without_setup_sets_up():
    dm = DigitsDataModule(batch_size=8)
    assert len(next(iter(dm.train_dataloader()))[0]) == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, r"`val_fraction` must be in \(0, 1\), got 0.0"),
        ({"val_fraction": 1.5}, r"`val_fraction` must be in \(0, 1\), got 1.5"),
        ({"batch_size": 0}, r"`batch_size` must be an int >= 1, got 0"),
    ],
)
def test_bad_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
