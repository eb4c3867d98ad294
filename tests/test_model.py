import math

import pytest
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.model import GPT

SMALL = ModelConfig(vocab_size=512, d_model=64, n_layer=2, n_head=4, context_length=64)


def test_shapes_and_loss_of_an_untrained_model_is_about_ln_vocab():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("1M", 4096, context_length=128))
    idx, targets = torch.randint(0, 4096, (2, 4, 128))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 128, 4096)
    assert loss.item() == pytest.approx(math.log(4096), abs=0.05)
    assert model(idx)[1] is None


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 512, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 512
    assert torch.equal(model(idx)[0][:, :20], model(changed)[0][:, :20])
    assert not torch.allclose(model(idx)[0][:, 20:], model(changed)[0][:, 20:])


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
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(SMALL).eval()
    hf_config = transformers.GPT2Config(
        vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {
        "transformer.wte.weight": ours.wte.weight,
        "transformer.wpe.weight": ours.wpe.weight,
        "transformer.ln_f.weight": ours.ln_f.weight,
        "transformer.ln_f.bias": ours.ln_f.bias,
    }
    for i, block in enumerate(ours.blocks):
        hf = f"transformer.h.{i}."
        for ours_name, hf_name in [("ln_1", "ln_1"), ("ln_2", "ln_2")]:
            state[hf + hf_name + ".weight"] = getattr(block, ours_name).weight
            state[hf + hf_name + ".bias"] = getattr(block, ours_name).bias
        for linear, hf_name in [
            (block.attn.qkv, "attn.c_attn"),
            (block.attn.proj, "attn.c_proj"),
            (block.mlp.up, "mlp.c_fc"),
            (block.mlp.down, "mlp.c_proj"),
        ]:
            state[hf + hf_name + ".weight"] = linear.weight.T  # transformers' Conv1D stores (in, out)
            state[hf + hf_name + ".bias"] = linear.bias
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_a_few_hundred_steps_on_one_batch_drive_the_loss_near_zero():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 512, (4, 65))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
