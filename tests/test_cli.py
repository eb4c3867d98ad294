import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import sample

from gpt_tinystories.cli import main


def run_cli(*args, cwd=None):
    """The real console entry point, in a fresh process: exit code, stdout, stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "gpt_tinystories", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return result.returncode, result.stdout, result.stderr


def snapshot(folder):
    return {
        p.relative_to(folder): p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
    }


def test_presets_print_true_sizes(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("28M-seed"))
    assert "1024" in line and "152,759,296" in line
    assert main(["presets", "--vocab-size", "4096"]) == 0
    assert "total@50257" not in capsys.readouterr().out


def test_prepare_writes_gpt2_shards_with_one_eos_per_story(tmp_path, gpt2):
    code, out, err = run_cli(
        "prepare", "--data", sample("train-head.txt"), "--tokenizer", "gpt2", "--out", tmp_path / "p"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    stories = sample("train-head.txt").read_text().split("<|endoftext|>")
    stories = [s.strip() for s in stories if s.strip()]
    assert meta["tokens"] == sum(len(gpt2.encode(s)) + 1 for s in stories)
    assert f"{meta['tokens']:,} tokens" in out
    code, out, _ = run_cli("prepare", "--data", sample("train-head.txt"), "--out", tmp_path / "p")
    assert code == 0 and "cached" in out


def test_tokenizer_train_then_prepare_with_it(tmp_path):
    code, out, err = run_cli(
        "tokenizer", "train", "--data", sample("train-head.txt"), "--vocab-size", "1024", "--out", tmp_path / "tok"
    )
    assert code == 0, err
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and "1024-token" in out
    code, out, err = run_cli(
        "prepare", "--data", sample("fixture-5-stories.txt"), "--tokenizer", tmp_path / "tok", "--out", tmp_path / "p"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["tokenizer"]["vocab_size"] == 1024


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "--data", "{tmp}/missing.txt"], "data not found"),
        (["prepare", "--data", "{tmp}/latin1.txt", "--out", "{tmp}/new"], "not valid UTF-8"),
        (["prepare", "--data", "{fixture}", "--tokenizer", "{tmp}/nope"], "tokenizer not found"),
        (["prepare", "--data", "{fixture}", "--out", "{tmp}/existing"], "not prepared data"),
        (["prepare", "--data", "roneneldan/TinyStories"], "pass local files"),
        (["prepare"], "required: --data"),
        (["tokenizer", "train", "--data", "{fixture}", "--vocab-size", "0", "--out", "{tmp}/t"], "positive integer"),
        (["tokenizer", "train", "--data", "{fixture}", "--vocab-size", "50", "--out", "{tmp}/t"], "too small"),
        (["presets", "--vocab-size", "many"], "positive integer"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(args, message, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("un café au lait".encode("latin-1"))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    args = [a.format(tmp=tmp_path, fixture=sample("fixture-5-stories.txt")) for a in args]
    code, out, err = run_cli(*args, cwd=tmp_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    code, _, err = run_cli("--debug", "prepare", "--data", tmp_path / "missing.txt")
    assert code != 0 and "Traceback" in err and "UserError" in err


def test_train_says_whether_its_story_ended_by_itself(tmp_path, capsys, monkeypatch):
    """The story printed at the end is cut at --sample-tokens or ends with EOS; the user is told which, and the
    EOS marker itself is not printed as text."""
    from gpt_tinystories.evaluate import Evaluator
    from gpt_tinystories.tokenizer import EOS

    args = ["train", "--preset", "1M", "--d-model", "32", "--n-layer", "1", "--n-head", "4", "--context-length", "32",
            "--batch-size", "2", "--tokens-per-step", "64", "--max-steps", "1", "--tokenizer", "bpe-300",
            "--precision", "fp32", "--sample-tokens", "3", "--data", str(sample("fixture-5-stories.txt"))]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    heading, story = capsys.readouterr().out.split("\n\n", 1)[1].splitlines()
    assert heading == "A story it wrote (cut at the 3-token limit before it ended; --sample-tokens sets the limit):"
    assert story.startswith("One day, a little girl named Lily") and story.endswith(" [...]")

    monkeypatch.setattr(Evaluator, "sample", lambda *_: f"Once upon a time.{EOS}")
    assert main([*args, "--out", str(tmp_path / "ended")]) == 0
    assert capsys.readouterr().out.split("\n\n", 1)[1].splitlines() == [
        "A story it wrote (it ended by itself):",
        "Once upon a time.",
    ]
