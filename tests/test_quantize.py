"""--dtype int8 and fp16: int8 Linear layers or fp16 weights on the CPU, close to fp32 on a (tiny) trained model."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import sample

from gpt_tinystories import load
from gpt_tinystories.checkpoint import load_model
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.data import TokenWindows, prepare
from gpt_tinystories.engine import Engine
from gpt_tinystories.errors import UserError
from gpt_tinystories.evaluate import evaluate
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.quantize import HalfLinear, apply_dtype, half_weights, quantize_int8
from gpt_tinystories.serve import model_info
from gpt_tinystories.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("int8")
    config = TrainConfig(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=str(bpe.save(root)),
                         d_model=64, n_layer=2, n_head=4, context_length=64, batch_size=8, tokens_per_step=512,
                         max_steps=30, lr=3e-3, warmup_steps=5, eval_every=30, eval_batches=1, sample_tokens=2,
                         precision="fp32")  # fmt: skip
    train(config, root / "run", progress=False)
    return root / "run"


def scored(tokenizer, *models):
    """The validation windows, and each model's bits per byte on them."""
    prepared = prepare(sample("validation-first1000.txt"), tokenizer, progress=False)
    windows = TokenWindows(prepared.tokens(), 64, seed=None, name="validation")
    token_bytes = torch.tensor(tokenizer.token_bytes())
    figures = [evaluate(m, windows, token_bytes, batch_size=16, max_batches=8).bits_per_byte for m in models]
    assert figures[0] < 3.0  # it learned something: the comparison means something
    return windows, figures


def test_int8_loss_and_logits_stay_close_to_fp32(trained):
    model, tokenizer, _ = load_model(trained)
    int8 = quantize_int8(model)
    int8_linear = torch.ao.nn.quantized.dynamic.Linear
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.blocks.modules())
    assert sum(isinstance(m, int8_linear) for m in int8.blocks.modules()) == 4 * model.config.n_layer
    assert int8.blocks[0].attn.qkv.weight().dtype == torch.qint8
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)  # the fp32 model is left as it was
    windows, (fp32, quantized) = scored(tokenizer, model, int8)
    assert abs(quantized / fp32 - 1) < 0.01, (fp32, quantized)
    inputs, _ = windows.batch(0, 4, torch.device("cpu"))
    with torch.no_grad():
        reference, ours = model(inputs), int8(inputs)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_int8_through_load_generate_and_eval(trained):
    teller = load(str(trained), "cpu", "int8")
    assert isinstance(teller.model.blocks[0].mlp.up, torch.ao.nn.quantized.dynamic.Linear)
    fp32 = load(str(trained), "cpu", "fp32")
    int8_info, fp32_info = model_info(teller), model_info(fp32)  # what /api/model says
    assert (int8_info["dtype"], fp32_info["dtype"]) == ("int8", "float32")
    assert int8_info["parameters"] == fp32_info["parameters"] == sum(p.numel() for p in fp32.model.parameters())
    prompt = [teller.tokenizer.eos_id, *teller.tokenizer.encode("Once upon a time")]
    ours, reference = (generate(t.model, [prompt], 12, Sampling(temperature=0))[0] for t in (teller, fp32))
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 9
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", "eval", "--checkpoint", str(trained), "--data",
                             str(sample("validation-first1000.txt")), "--dtype", "int8", "--max-batches", "2",
                             "--json"], capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0 and '"bits_per_byte"' in result.stdout, result.stderr


def test_int8_without_kernels_is_refused_in_one_line(trained):
    model = load_model(trained)[0].to("meta")
    with pytest.raises(UserError, match=r"^--dtype int8 runs on the CPU only .* --device cpu$"):
        apply_dtype(model, "int8")
    with pytest.raises(UserError, match=r"^--dtype fp16 is for decoding on a CPU; on meta use --dtype bf16"):
        apply_dtype(model, "fp16")
    with pytest.raises(UserError, match="dtype must be one of fp32, bf16, fp16, int8"):
        apply_dtype(model, "int4")


def test_fp16_weights_score_and_decode_as_fp32_does(trained):
    model, tokenizer, _ = load_model(trained)
    half = half_weights(model)
    assert sum(isinstance(m, HalfLinear) for m in half.modules()) == 4 * model.config.n_layer + 1  # + the head
    assert half.blocks[0].attn.qkv.half_weight.dtype == torch.float16 and half.wte.weight.dtype == torch.float32
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear) and model.lm_head is None  # left as it was
    _, (fp32, fp16) = scored(tokenizer, model, half)
    assert abs(fp16 / fp32 - 1) < 1e-3, (fp32, fp16)
    prompt = [tokenizer.eos_id, *tokenizer.encode("Once upon a time")]
    with torch.no_grad():  # one row at a time: the fp16 kernel, not the fp32 one of several rows
        step = half(torch.tensor([prompt[:1]]))[0, -1]
        reference = model(torch.tensor([prompt[:1]]))[0, -1]
    assert 0 < (step - reference).abs().max() < 0.01 * reference.abs().max()
    ours, theirs = (generate(m, [prompt], 20, Sampling(temperature=0))[0] for m in (half, model))
    assert ours == theirs


def test_fp16_weights_through_the_compiled_decode_step(trained):
    half = load(str(trained), "cpu", "fp16")
    info = model_info(half)
    assert info["dtype"] == "fp16" and info["parameters"] == load(str(trained), "cpu", "fp32").model.num_parameters()
    prompt = [half.tokenizer.eos_id, *half.tokenizer.encode("Once upon a time")]
    tokens = []
    for compile in (False, True):
        engine = Engine(half.model, 1, capacity=64, compile=compile)
        sequence = engine.add(prompt, 16, Sampling(temperature=0))
        while engine.busy:
            engine.step()
        tokens.append(sequence.generated)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 16
