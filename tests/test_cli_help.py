import re
from dataclasses import fields

import pytest

from gpt_tinystories.cli import main
from gpt_tinystories.config import TrainConfig


def help_text(capsys, *verb: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main([*verb, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_train_help_shows_each_flags_real_default_and_allowed_values(capsys):
    out = help_text(capsys, "train")
    flat = " ".join(out.split())  # argparse wraps to the terminal's width
    assert "--position STR one of learned, rope, none; default: learned" in flat  # no preset sets it
    assert "--activation STR one of gelu_tanh, gelu, relu2, swiglu; default: gelu_tanh" in flat
    assert "--precision STR one of auto, bf16, fp32; default: auto" in flat
    assert "--preset STR one of 1M, 3M, 8M, 28M, 33M, 28M-seed; default: 8M" in flat
    assert "--lr FLOAT default: the preset's" in flat and "--context-length INT default: 512" in flat
    assert "--n-kv-head INT default: n_head" in flat and "--checkpoint-every INT default: at every evaluation" in flat
    assert "--max-steps INT default: none (with no budget at all: 1 epoch)" in flat
    assert "--qk-norm, --no-qk-norm default: False" in flat and "--bias, --no-bias default: True" in flat
    assert "set by the preset or unlimited" not in out
    entries = {entry.split()[0].rstrip(","): entry for entry in flat.split(" --")[1:]}  # each flag's line(s) of help
    for field in fields(TrainConfig):
        flag = field.name.replace("_", "-")
        assert "default: " in entries[flag] + entries.get(f"no-{flag}", ""), field.name  # --x, --no-x: help


def test_train_help_ends_with_the_per_preset_defaults(capsys):
    out = help_text(capsys, "train")
    table = out[out.index("defaults per preset") :]
    assert re.search(r"^\s+8M\s+256\s+8\s+16\s+0\.001\s+65,536\s+200$", table, re.M)
    assert re.search(r"^\s+1M\s+64\s+8\s+16\s+0\.003\s+32,768\s+100$", table, re.M)
    assert len([line for line in table.splitlines() if line.strip()]) == 2 + 6  # title, header, six presets


def test_every_verb_shows_its_flags_defaults(capsys):
    flat = " ".join(help_text(capsys, "generate").split())
    assert "--max-new-tokens MAX_NEW_TOKENS a cap: stories stop at their end (default: 1000)" in flat
    assert "--device DEVICE (default: auto)" in flat
    assert "0 is greedy (default: 0.8)" in flat and flat.count("(default: 0.8)") == 1  # not repeated
    flat = " ".join(help_text(capsys, "eval").split())
    assert "--batch-size BATCH_SIZE (default: 16)" in flat and "--json print the figures as JSON" in flat
