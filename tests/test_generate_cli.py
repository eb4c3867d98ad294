"""The generate and eval commands and the Python API, on a model trained for a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sample

from gpt_tinystories import load
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("gen")
    config = TrainConfig(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=str(bpe.save(root)),
                         d_model=32, n_layer=2, n_head=4, context_length=64, batch_size=8, tokens_per_step=512,
                         max_steps=30, eval_every=15, eval_batches=2, sample_tokens=4, precision="fp32")  # fmt: skip
    train(config, root / "run", progress=False)
    return root / "run"


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def test_generate_prints_the_prompt_and_its_continuation(run_dir):
    code, out, err = cli("generate", "--checkpoint", run_dir, "--prompt", "Once upon a time", "--seed", "3",
                         "--max-new-tokens", "20")  # fmt: skip
    assert code == 0, err
    teller = load(run_dir)
    expected = teller.generate("Once upon a time", max_new_tokens=20, seed=3)
    assert out == "Once upon a time" + expected + "\n"
    assert err == "note: cut at the 20-token limit before the story ended; --max-new-tokens raises it\n"
    code, again, _ = cli("generate", "--checkpoint", run_dir, "--prompt", "Once upon a time", "--seed", "3",
                         "--max-new-tokens", "20", "--no-stream")  # fmt: skip
    assert again == out


def test_the_example_script_prints_four_stories_or_one_line(run_dir, tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "lily_needle.py"
    result = subprocess.run([sys.executable, example, run_dir], capture_output=True, text=True, timeout=300)
    prompt = "One day, a little girl named Lily found a needle in her room"
    assert result.returncode == 0 and result.stdout.count(prompt) == 4 and "Beam search: " in result.stdout, result
    result = subprocess.run([sys.executable, example, tmp_path / "none"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "", result
    assert (
        result.stderr == f"lily_needle.py: no checkpoint at {tmp_path / 'none'}; pass a run dir or a checkpoint "
        "folder (one holding meta.json and model.safetensors)\n"
    )


def test_generate_prints_a_story_that_ended_without_a_note(run_dir, capsys, monkeypatch):
    from gpt_tinystories.cli import main
    from gpt_tinystories.generate import Storyteller
    from gpt_tinystories.tokenizer import EOS

    monkeypatch.setattr(Storyteller, "stream", lambda *_, **__: iter(["Lily ", "smiled.", EOS]))
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "Once. "]) == 0
    assert capsys.readouterr() == ("Once. Lily smiled.\n", "")


def test_generate_samples_beams_and_long_prompts(run_dir):
    code, out, err = cli("generate", "--checkpoint", run_dir / "checkpoints" / "best", "--num-samples", "2",
                         "--max-new-tokens", "5", "--seed", "1")  # fmt: skip
    assert code == 0, err
    assert out.count("--- sample") == 2
    code, out, err = cli("generate", "--checkpoint", run_dir, "--prompt", "Tom", "--beams", "3",
                         "--max-new-tokens", "8")  # fmt: skip
    assert code == 0 and out.startswith("Tom"), err
    code, out, err = cli("generate", "--checkpoint", run_dir, "--prompt", "la " * 100, "--max-new-tokens", "3")
    assert code == 2 and "more than the model's context of 64" in err and "--truncate-prompt" in err and not out
    code, out, err = cli("generate", "--checkpoint", run_dir, "--prompt", "la " * 100, "--max-new-tokens", "3",
                         "--truncate-prompt")  # fmt: skip
    assert code == 0 and "keeping its last 64" in err


def test_eval_reports_fair_metrics_as_json(run_dir, bpe):
    code, out, err = cli("eval", "--checkpoint", run_dir, "--data", sample("validation-first1000.txt"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["step"] == 30 and report["tokens"] % 64 == 0
    assert report["loss"] == pytest.approx(report["nats_per_gpt2_token"] * report["gpt2_tokens"] / report["tokens"])
    assert report["bits_per_byte"] < report["loss"] and report["perplexity"] > 1
    # the text evaluated holds about as many GPT-2 tokens as tokens of our 4096 BPE
    assert 0.8 < report["gpt2_tokens"] / report["tokens"] < 1.2
    code, out, err = cli("eval", "--checkpoint", run_dir, "--data", sample("fixture-5-stories.txt"))
    assert code == 0 and "bits per byte" in out and "nats per GPT-2 token" in out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--checkpoint", "{tmp}/none"], "no checkpoint at"),
        (["generate", "--checkpoint", "{run}", "--max-new-tokens", "0"], "positive integer"),
        (["generate", "--checkpoint", "{run}", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "--checkpoint", "{run}", "--temperature", "nan"], "temperature must be >= 0 and finite"),
        (["generate", "--checkpoint", "{run}", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "--checkpoint", "{run}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "--checkpoint", "{run}", "--seed", "-1"], "seed must be in [0, 2**63), got -1"),
        (
            ["generate", "--checkpoint", "{run}", "--beams", "2", "--num-samples", "2"],
            "beam search (--beams 2) writes the same story every time: pass --num-samples 1",
        ),
        (
            ["generate", "--checkpoint", "{run}", "--temperature", "0", "--num-samples", "3"],
            "greedy decoding (--temperature 0) writes the same story every time",
        ),
        (
            ["generate", "--checkpoint", "{run}", "--beams", "2", "--top-k", "5"],
            "beam search (--beams) samples nothing",
        ),
        (["generate", "--checkpoint", "{run}", "--beams", "2", "--temperature", "0.5"], "leave out --temperature"),
        (["generate", "--checkpoint", "{broken}"], "damaged"),
        (["generate", "--checkpoint", "{notok}"], "has no tokenizer.json"),
        (["eval", "--checkpoint", "{run}", "--data", "{tmp}/missing.txt"], "data not found"),
    ],
)
def test_bad_generate_and_eval_input(args, message, run_dir, tmp_path):
    import shutil

    broken, notok = tmp_path / "broken", tmp_path / "notok"
    shutil.copytree(run_dir / "checkpoints" / "best", broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    shutil.copytree(run_dir / "checkpoints" / "best", notok)
    (notok / "tokenizer.json").unlink()
    args = [a.format(tmp=tmp_path, run=run_dir, broken=broken, notok=notok) for a in args]
    code, out, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        load(tmp_path)


def test_bf16_weights_for_faster_decoding(run_dir):
    import torch

    teller = load(run_dir, dtype="bf16")
    assert teller.model.wte.weight.dtype == torch.bfloat16
    assert isinstance(teller.generate("Once", max_new_tokens=5, seed=0), str)
    with pytest.raises(UserError, match="dtype must be one of fp32, bf16, fp16, int8"):
        load(run_dir, dtype="fp8")
