"""Attention kernels (attention.py): each equals today's SDPA attention, document masking is exact, KV-cache
decoding matches the whole-sequence forward, and a kernel that cannot run is refused in one line."""

import functools

import pytest
import torch

from gpt_tinystories import attention
from gpt_tinystories.attention import AttentionPlan, document_ids, document_positions
from gpt_tinystories.config import ModelConfig, TrainConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.model import GPT

EOS = 0
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    values = {"vocab_size": 50, "d_model": 32, "n_layer": 2, "n_head": 4, "context_length": 64, **overrides}
    return GPT(ModelConfig(**values))


def packed(batch: int = 3, time: int = 48, seed: int = 1) -> torch.Tensor:
    """Token rows with stories of varied length: EOS at random places, including position 0 and the end."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 50, (batch, time), generator=generator)
    idx[torch.rand(batch, time, generator=generator) < 0.1] = EOS
    idx[0, 0], idx[1, -1] = EOS, EOS
    return idx


def test_document_ids_and_positions_restart_at_each_eos():
    idx = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4]])
    assert document_ids(idx, EOS).tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3]]
    assert document_positions(idx, EOS).tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1]]


@pytest.mark.parametrize("time", [49, 48])  # windows of 48 (blocked: in halves) and 47 (plain SDPA)
@pytest.mark.parametrize("kernel", ["sdpa", "blocked", "auto"])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kernels_train_like_todays_attention(kernel, position, time):
    """Without documents every kernel gives the logits and gradients of plain causal SDPA (attention = sdpa)."""
    idx = packed(time=time)
    reference, model = tiny(position=position, attention="sdpa"), tiny(position=position, attention=kernel)
    reference.loss(idx[:, :-1], idx[:, 1:]).backward()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_blocked_and_dense_document_masks_agree_in_forward_and_backward(position):
    idx = packed()
    dense, blocked = (tiny(position=position, document_mask=True, eos_id=EOS, attention=k) for k in ("sdpa", "blocked"))
    dense.loss(idx[:, :-1], idx[:, 1:]).backward()
    blocked.loss(idx[:, :-1], idx[:, 1:]).backward()
    torch.testing.assert_close(blocked(idx), dense(idx), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(blocked.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kernel", ["sdpa", "blocked"])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_storys_loss_does_not_change_when_another_story_is_packed_before_it(kernel, position):
    model = tiny(position=position, document_mask=True, eos_id=EOS, attention=kernel)
    story = torch.tensor([[EOS, 11, 12, 13, 14, 15, 16, 17, 18]])
    other = torch.tensor([[21, 22, 23, 24, 25, 26, 27]])  # the tail of an earlier story
    alone = model.loss(story[:, :-1], story[:, 1:], reduction="sum")
    both = torch.cat([other, story], dim=1)
    start = other.shape[1]
    logits = model(both[:, :-1])[:, start:]
    after = torch.nn.functional.cross_entropy(logits.flatten(0, 1), both[0, start + 1 :], reduction="sum")
    torch.testing.assert_close(after, alone, atol=1e-5, rtol=1e-6)
    # ...while without document masking the earlier story does change it
    unmasked = tiny(position=position, attention=kernel)
    unmasked_logits = unmasked(both[:, :-1])[:, start:]
    assert not torch.allclose(unmasked_logits, unmasked(story[:, :-1]), atol=1e-3)


@pytest.mark.parametrize("length", [20, 21])  # 21 and 22 positions: blocked without documents in halves at 22
@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("kernel", ["sdpa", "blocked"])
def test_kv_cache_decoding_equals_the_whole_sequence_forward(kernel, document_mask, length):
    """A prompt is one story (EOS first, none after): decoding token by token from the cache gives the logits
    the training-time kernels give for the whole sequence."""
    model = tiny(attention=kernel, document_mask=document_mask, eos_id=EOS, position="rope").eval()
    story = torch.randint(1, 50, (1, length), generator=torch.Generator().manual_seed(3))
    idx = torch.cat([torch.tensor([[EOS]]), story], dim=1)
    with torch.no_grad():
        whole = model(idx)
        cache = model.new_cache(1, idx.shape[1])
        steps = [model(idx[:, :8], cache)] + [model(idx[:, t : t + 1], cache) for t in range(8, idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_auto_measures_once_per_shape_and_picks_a_candidate():
    attention._chosen.clear()
    model = tiny(document_mask=True, eos_id=EOS)
    idx = packed()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    ((device, training, dtype, *shape), choice), *others = attention._chosen.items()
    assert not others and (device, training, choice in ("blocked", "sdpa")) == ("cpu", True, True)
    assert shape == [3, 4, 47, 8]


def test_the_causal_kernel_is_measured_where_the_halves_can_run():
    cpu = torch.device("cpu")
    assert attention.choose_causal_kernel((2, 4, 48, 8), torch.float32, cpu, 0.0) in ("blocked", "sdpa")
    assert attention.halves_problem(cpu, 48, 0.0) is None
    assert attention.halves_problem(cpu, 47, 0.0) == "the halves need an even length"
    assert attention.halves_problem(cpu, 48, 0.1) == "the halves have no dropout"
    assert attention.halves_problem(torch.device("meta"), 48, 0.0).startswith("the halves use PyTorch's CPU")
    with torch.random.fork_rng():
        state = torch.get_rng_state()
        attention.choose_causal_kernel((2, 4, 48, 8), torch.float32, cpu, 0.0)
        assert torch.equal(torch.get_rng_state(), state)  # no draws from the run's generator


def test_blocked_without_documents_names_its_fallback_to_sdpa_once(capsys):
    attention._told.clear()
    model = tiny(attention="blocked", attention_dropout=0.1)  # the halves have no dropout
    idx = packed(time=49)
    for _ in range(2):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    model.eval()(idx[:, :-2])  # an odd length falls back silently: it is a batch's, not a setting
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["attention blocked: the halves have no dropout; causal SDPA instead"]


@pytest.mark.parametrize(
    ("backward", "why"),
    [(lambda *args, **kwargs: [2 * g for g in FLASH_BACKWARD(*args, **kwargs)], "their results differ"),
     (lambda *args: FLASH_BACKWARD(*args), "TypeError: ")],  # another signature: scale is no keyword there
    ids=["results", "signature"],
)  # fmt: skip
def test_halves_that_fail_their_check_fall_back_to_sdpa_in_one_line(monkeypatch, capsys, backward, why):
    """The halves call private ops: where this torch's differ (results or signature), a run attends with SDPA."""
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", backward)
    attention._halves_check.cache_clear()
    attention._told.clear()
    try:
        problem = attention.halves_problem(torch.device("cpu"), 48, 0.0)
        assert problem.startswith(f"the halves failed their check against SDPA on torch {torch.__version__} ({why}")
        assert attention.choose_causal_kernel((2, 4, 48, 8), torch.float32, torch.device("cpu"), 0.0) == "sdpa"
        losses = []
        for kernel in ("blocked", "sdpa"):
            model, idx = tiny(attention=kernel), packed()
            loss = model.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()
            losses.append((loss, model.blocks[0].attn.qkv.weight.grad))
        assert torch.equal(*(loss for loss, _ in losses)) and torch.equal(*(grad for _, grad in losses))
        assert capsys.readouterr().err.splitlines() == [f"attention: {problem}; causal SDPA instead"]
    finally:
        attention._halves_check.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_causal_halves_equal_causal_sdpa_in_forward_and_backward(dtype, layout):
    """The halves' merged output and every gradient equal one causal SDPA call: in the model's layout (views of
    one qkv projection) and contiguous, in fp32 and bf16 (bf16: within its rounding)."""
    batch, heads, time, size = 3, 4, 48, 8
    qkv = torch.randn(batch, time, 3 * heads * size, generator=torch.Generator().manual_seed(5)).to(dtype)
    grad = torch.randn(batch, heads, time, size, generator=torch.Generator().manual_seed(6)).to(dtype)
    results = []
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    for kernel in (sdpa, functools.partial(attention.CausalHalves.apply, scale=None)):
        leaf = qkv.clone().requires_grad_()
        q, k, v = (t.view(batch, time, heads, size).transpose(1, 2) for t in leaf.split(heads * size, dim=-1))
        if layout == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = kernel(q, k, v)
        out.backward(grad)
        results.append((out, leaf.grad))
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, **tolerance)


def test_auto_on_cpu_training_names_the_fallback_once(capsys):
    attention._told.clear()
    model = tiny(document_mask=True, eos_id=EOS)
    idx = packed()
    for _ in range(2):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attention auto: torch ") and "instead of flex" in lines[0]


def test_forced_flex_where_it_cannot_train_is_a_user_error():
    model = tiny(attention="flex")
    idx = packed()
    with pytest.raises(UserError, match="attention flex: torch .* no flex_attention backward on CPU; use attention"):
        model.loss(idx[:, :-1], idx[:, 1:])


def test_dense_mask_is_causal_within_stories():
    plan = AttentionPlan("sdpa", document_ids(torch.tensor([[3, EOS, 4, 5]]), EOS))
    assert plan.dense_mask()[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match="document_mask needs eos_id"):
        ModelConfig(vocab_size=50, d_model=32, n_head=4, document_mask=True)
    with pytest.raises(UserError, match="attention must be one of auto, sdpa, flex, blocked, got 'fast'"):
        TrainConfig(attention="fast").resolved()
    assert TrainConfig(document_mask=True).model_config(vocab_size=50, eos_id=7).eos_id == 7
    assert TrainConfig().model_config(vocab_size=50, eos_id=7).eos_id is None


def test_the_cpu_recipe_config_builds_a_model_that_trains():
    from pathlib import Path

    from gpt_tinystories.config import load_config_file
    from gpt_tinystories.hf import architecture

    config = TrainConfig.from_dict(load_config_file(Path(__file__).parents[1] / "configs/cpu-10min.toml")).resolved()
    model_config = config.model_config(vocab_size=4096, eos_id=EOS)
    # the study's winner (docs/study-cpu-10min.md): 128 wide, 4 layers, 4 heads of 32, rotary, 4,096 tokens a step, WSD
    assert (model_config.d_model, model_config.n_layer, model_config.n_head, model_config.head_size) == (128, 4, 4, 32)
    # on a CPU that plans few passes at that width, 96 wide with 3 heads of 32 (config.NARROW_BELOW_PASSES)
    narrow = config.narrowed(model_config)
    assert (narrow.d_model, narrow.n_head, narrow.head_size) == (96, 3, 32)
    assert config.max_time == "10m" and config.tokens_per_step == 4096 and config.precision == "auto"
    assert (config.schedule, config.decay_fraction, config.weight_decay, config.lr) == ("wsd", 0.3, 0.6, 7e-3)
    assert config.warmup_steps == 100 and config.min_lr_ratio == 0.0
    # dropout chosen by the run from its passes over the sample (trainer.auto_dropout); none until then
    assert (config.dropout, config.attention_dropout, model_config.dropout) == ("auto", 0.0, 0.0)
    assert model_config.position == "rope" and architecture(model_config) == "gpt_neox"  # exports to hf and GGUF
    model = GPT(model_config)
    idx = torch.randint(1, 4096, (2, 65))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(4096.0)).item()) < 0.5


def test_train_cli_forcing_flex_where_it_cannot_train_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    from conftest import sample

    from gpt_tinystories.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "1M", "--d-model", "32", "--n-layer", "1", "--n-head", "4", "--context-length", "32",
            "--batch-size", "2", "--tokens-per-step", "64", "--max-steps", "1", "--tokenizer", "bpe-300",
            "--data", str(sample("fixture-5-stories.txt")), "--attention", "flex", "--out", str(out)]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gpt-tinystories: error: attention flex: torch {torch.__version__} has no flex_attention backward on CPU; "
        "use attention = auto, blocked or sdpa"
    ]
    assert not out.exists()


@pytest.mark.parametrize("documents", [False, True])
def test_cpu_attention_under_bf16_autocast_runs_in_fp32_and_returns_bf16(monkeypatch, documents):
    """PyTorch's CPU kernels are mostly slower in bf16 than in fp32 (benchmarks/attention_dtype.py), so by default
    bf16 autocast must not reach them: autocast would cast fp32 inputs straight back down."""
    functional = torch.nn.functional
    original, seen = functional.scaled_dot_product_attention, []

    def recording(q, *args, **kwargs):
        seen.append(q.dtype)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", recording)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    docs = document_ids(packed(2, 16), EOS) if documents else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AttentionPlan("sdpa", docs)(q, k, v, None)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    expected = AttentionPlan("sdpa", docs)(q.float(), k.float(), v.float(), None)
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where training measured bf16 faster (choose_precision)
        AttentionPlan("sdpa", docs, cpu_fp32=False)(q, k, v, None)
    assert seen == [torch.bfloat16]
