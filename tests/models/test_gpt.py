import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sq_lightning.models import CharGPT, CharLanguageModel
from sq_lightning.models.language_model import cosine_warmup_factor


def test_parameter_count_matches_the_architecture():
    v, t, n_layer, d = 65, 32, 3, 48
    net = CharGPT(v, t, n_layer, 4, d)
    per_block = 4 * d * d + 8 * d * d + 4 * d  # qkv + proj, MLP 4x, two LayerNorms (gain + bias)
    expected = v * d + t * d + n_layer * per_block + 2 * d + d * v  # embeddings, blocks, final LN, head
    assert sum(p.numel() for p in net.parameters()) == expected


def test_attention_is_causal():
    torch.manual_seed(0)
    net = CharGPT(20, 16, 2, 2, 32).eval()
    x = torch.randint(0, 20, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 20, (2, 7))
    a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # positions before the change see the same context
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_attention_equals_explicit_masked_softmax():
    torch.manual_seed(1)
    net = CharGPT(10, 8, 1, 2, 16).eval()
    attn = net.blocks[0].attn
    x = torch.randn(3, 8, 16)
    q, k, v = attn.qkv(x).split(16, dim=2)
    q, k, v = (z.view(3, 8, 2, 8).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 8, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_validation_loss_is_the_mean_cross_entropy_per_character_and_bpc_its_base_2():
    torch.manual_seed(0)
    model = CharLanguageModel(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)
    x, y = torch.randint(0, 12, (11, 8)), torch.randint(0, 12, (11, 8))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4 and 3 blocks
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, loader, verbose=False)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).reshape(-1, 12), y.reshape(-1)).item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    assert cosine_warmup_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert cosine_warmup_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert cosine_warmup_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert cosine_warmup_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert cosine_warmup_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_a_few_steps_learn_and_weight_decay_skips_gains_and_biases(tmp_path):
    torch.manual_seed(0)
    text = torch.arange(6).repeat(200)  # a periodic "text": the next token is predictable
    starts = torch.arange(0, 600, 7)
    x = torch.stack([text[i : i + 16] for i in starts])
    y = torch.stack([text[i + 1 : i + 17] for i in starts])
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    model = CharLanguageModel(vocab_size=6, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=True, lr=1e-2,
                              warmup_steps=2)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, train, val)
    assert trainer.callback_metrics["val/loss"] < 0.5  # from log(6) = 1.79
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])


def test_init_from_loads_strictly_and_names_a_mismatch(tmp_path):
    a = CharLanguageModel(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path / "net.pt"
    torch.save(a.model.state_dict(), path)
    b = CharLanguageModel(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16, init_from=str(path))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(RuntimeError, match=r"init_from.*Shape mismatches"):
        CharLanguageModel(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=32, init_from=str(path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 30, "n_head": 4}, "must be a multiple of `n_head`"),
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"betas": (0.9, 1.0)}, "`betas` must be two numbers"),
        ({"schedule": "step"}, "`schedule` must be 'cosine' or 'constant'"),
        ({"n_layer": 0}, "`n_layer` must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CharLanguageModel(**kwargs)


def test_longer_sequence_than_the_context_is_refused():
    with pytest.raises(ValueError, match="longer than `block_size`"):
        CharGPT(10, 8, 1, 2, 16)(torch.zeros(1, 9, dtype=torch.long))
