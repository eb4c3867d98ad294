import math

import pytest
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.model import GPT, Dropout

SMALL = ModelConfig(vocab_size=512, d_model=64, n_layer=2, n_head=4, context_length=64)


def test_shapes_and_loss_of_an_untrained_model_is_about_ln_vocab():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("1M", 4096, context_length=128))
    idx, targets = torch.randint(0, 4096, (2, 4, 128))
    assert model(idx).shape == (4, 128, 4096)
    assert model.loss(idx, targets).item() == pytest.approx(math.log(4096), abs=0.05)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 512, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 512
    assert torch.equal(model(idx)[:, :20], model(changed)[:, :20])
    assert not torch.allclose(model(idx)[:, 20:], model(changed)[:, 20:])


@pytest.mark.parametrize("attention_dropout", [None, 0.0, 0.2])
def test_attention_dropout_is_its_own_rate_and_defaults_to_dropout(monkeypatch, attention_dropout):
    import torch.nn.functional as F

    rates = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, dropout_p=0.0, **kwargs):
        rates.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    config = ModelConfig(**{**SMALL.to_dict(), "dropout": 0.1, "attention_dropout": attention_dropout})
    model = GPT(config)
    model(torch.randint(0, 512, (2, 16)))
    expected = 0.1 if attention_dropout is None else attention_dropout
    assert config.attention_dropout == expected and rates == [expected] * SMALL.n_layer
    rates.clear()
    model.eval()(torch.randint(0, 512, (2, 16)))
    assert rates == [0.0] * SMALL.n_layer
    # A config saved before the field existed meant one rate everywhere.
    old = {k: v for k, v in config.to_dict().items() if k != "attention_dropout"}
    assert ModelConfig.from_dict(old).attention_dropout == 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_p_of_the_elements_scales_the_rest_and_follows_the_seed(dtype):
    dropout = Dropout(0.1)
    x = torch.rand(4, 1000, 251).add_(0.5).to(dtype).requires_grad_()  # an odd count: the last draw is cut
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert y.dtype == dtype and kept.float().mean().item() == pytest.approx(0.9, abs=0.002)
    scale = torch.tensor(1 / 0.9, dtype=dtype)  # as nn.Dropout: 1 / (1 - p) in the input's precision
    assert torch.equal(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.equal(x.grad, kept.to(dtype) * scale)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)
    assert not torch.equal(dropout(x), y)  # each call draws a new mask
    assert (dropout(x)[-1] != 0).float().mean().item() == pytest.approx(0.9, abs=0.003)  # the last row drawn too
    assert torch.equal(dropout.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


def test_gpt2_init_scales_residual_projections_and_ties_the_head():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("8M", 4096))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.up.bias.abs().max().item() == 0


def test_rejects_sequences_longer_than_the_context():
    with pytest.raises(ValueError, match="context_length=64"):
        GPT(SMALL)(torch.zeros(1, 65, dtype=torch.long))


def test_same_logits_as_transformers_gpt2_with_the_same_weights():
    pytest.importorskip("transformers")
    from gpt_tinystories.hf import to_transformers

    torch.manual_seed(0)
    ours = GPT(SMALL).eval()
    theirs = to_transformers(ours)
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()  # tied, as ours
    idx = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_a_few_hundred_steps_on_one_batch_drive_the_loss_near_zero():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 512, (4, 65))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("vocab_size", [2048, 4096, 50257])  # 768 rows: one chunk, two (512 + 256 on a CPU), five
def test_fused_loss_equals_cross_entropy_of_the_logits_with_the_same_gradients(vocab_size):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, d_model=32, n_layer=1, n_head=2, context_length=256))
    idx, targets = torch.randint(0, vocab_size, (2, 3, 256))
    reference = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model.loss(idx, targets)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert model.loss(idx, targets, reduction="sum").item() == pytest.approx(reference.item() * 768, rel=1e-5)


def test_fused_loss_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx, targets = torch.randint(0, 512, (2, 4, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(idx, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and model.wte.weight.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(model.loss(idx, targets).item(), rel=1e-2)
