"""Every architecture variant: parameter counts, training, KV-cache decoding and export to transformers."""

import pytest
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.model import GPT

VARIANTS = {
    "gpt2": {},
    "rope": {"position": "rope"},
    "nope": {"position": "none"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"activation": "swiglu"},
    "relu2": {"activation": "relu2"},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "qk_norm": {"qk_norm": True},
    "no_bias": {"bias": False},
    "untied": {"tied_embeddings": False},
    "parallel": {"parallel_blocks": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 2, "bias": False},
}


def config(variant: str, **overrides) -> ModelConfig:
    base = {"vocab_size": 256, "d_model": 32, "n_layer": 2, "n_head": 4, "context_length": 48}
    return ModelConfig(**base | VARIANTS[variant] | overrides)


def model(variant: str, **overrides) -> GPT:
    torch.manual_seed(0)
    net = GPT(config(variant, **overrides)).eval()
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a mapping that drops one shows
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return net


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_from_the_config_matches_the_module(variant):
    for overrides in ({}, {"vocab_size": 4096, "d_model": 64, "n_head": 8}):
        net, shape = GPT(config(variant, **overrides)), config(variant, **overrides)
        assert shape.num_parameters() == net.num_parameters()
        assert shape.num_parameters(non_embedding=True) == net.num_parameters(non_embedding=True)


def test_variants_change_what_they_name():
    assert GPT(config("rope")).wpe is None and GPT(config("gpt2")).wpe is not None
    assert isinstance(GPT(config("rmsnorm")).ln_f, torch.nn.RMSNorm)
    assert GPT(config("mqa")).blocks[0].attn.qkv.out_features == 32 + 2 * 8  # 4 query heads, 1 key/value head
    assert GPT(config("untied")).head_weight is not GPT(config("untied")).wte.weight
    assert GPT(config("parallel")).blocks[0].ln_2 is None
    assert config("swiglu").mlp_hidden == 88  # 2/3 of 4 x 32, rounded up to a multiple of 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_overfits_one_batch(variant):
    torch.manual_seed(0)
    net = GPT(config(variant))
    idx = torch.randint(0, 256, (2, 17))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-2)
    first = None
    for _ in range(80):
        loss = net.loss(idx[:, :-1], idx[:, 1:])
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5.0 and loss.item() < 0.1, (first, loss.item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recomputation(variant):
    net = model(variant)
    torch.manual_seed(1)
    sequence = torch.randint(0, 256, (2, 40))
    cache = net.new_cache(2, 40)
    torch.testing.assert_close(net(sequence[:, :10], cache), net(sequence[:, :10]), atol=1e-5, rtol=0)
    for end in range(11, 41):  # positions (learned or rotary) continue from the cache's length
        step = net(sequence[:, end - 1 : end], cache)[:, -1]
        torch.testing.assert_close(step, net(sequence[:, :end])[:, -1], atol=1e-5, rtol=0)
    # left-padded rows of a batch: each row's positions start at its first real token
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 11, 7)]
    together = generate(net, prompts, 12, Sampling(temperature=0))
    assert together == [generate(net, [p], 12, Sampling(temperature=0))[0] for p in prompts]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_loss_is_close_to_fp32(variant):
    net = model(variant)
    idx = torch.randint(0, 256, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net.loss(idx[:, :-1], idx[:, 1:])
    assert low.item() == pytest.approx(net.loss(idx[:, :-1], idx[:, 1:]).item(), rel=2e-2)


EXPORTS = {"gpt2": "GPT2LMHeadModel", "untied": "GPT2LMHeadModel", "rope": "GPTNeoXForCausalLM",
           "llama": "LlamaForCausalLM"}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_maps_to_the_matching_transformers_model_or_says_why_not(variant):
    pytest.importorskip("transformers")
    from gpt_tinystories.hf import to_transformers

    net = model(variant, **({"rope_theta": 500.0} if variant in ("rope", "llama") else {}))
    if variant not in EXPORTS:
        with pytest.raises(UserError, match="transformers has no architecture for this model") as error:
            to_transformers(net)
        assert "\n" not in str(error.value)
        return
    theirs = to_transformers(net)
    assert type(theirs).__name__ == EXPORTS[variant]
    idx = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ours = net(idx)
        assert ours.std() > 0.1  # logits large enough that a wrong mapping shows
        torch.testing.assert_close(theirs(idx).logits, ours, atol=1e-4, rtol=1e-4)
