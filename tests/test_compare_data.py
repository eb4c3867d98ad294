"""`compare --data`: every run's best checkpoint scored by the same Evaluator on the same text."""

import json

import torch
from conftest import sample

from gpt_tinystories import checkpoint, cli
from gpt_tinystories.config import ModelConfig, TrainConfig
from gpt_tinystories.evaluate import Evaluator
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import TOKENIZER_FILE

DATA = sample("validation-first1000.txt")


def make_run(run_dir, tokenizer, context, seed):
    """A run dir as training leaves it, with a randomly initialised model as its best checkpoint."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, context_length=context)
    meta = {"step": 1, "model_config": config.to_dict(), "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash}}
    files = {TOKENIZER_FILE: tokenizer.backend.to_str()}
    checkpoint.save(run_dir / "checkpoints" / "best", GPT(config).state_dict(), meta, None, files)
    train = TrainConfig(preset="1M", context_length=context).to_dict()
    (run_dir / "config.json").write_text(json.dumps({"train": train, "model": config.to_dict(), "precision": "fp32"}))
    record = {"kind": "eval", "step": 1, "tokens": 100, "val_loss": 8.0, "val_bpb": 3.0, "seconds": 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")


def test_compare_scores_each_best_checkpoint_on_the_same_data_at_the_shortest_context(tmp_path, bpe, gpt2):
    make_run(tmp_path / "short", bpe, 32, seed=1)
    make_run(tmp_path / "long", gpt2, 64, seed=2)
    args = ["compare", str(tmp_path / "short"), str(tmp_path / "long"), "--out", str(tmp_path / "cmp")]
    assert cli.main([*args, "--data", str(DATA), "--max-batches", "2", "--batch-size", "4"]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    section = report[report.index("## On the same data") :]
    assert "in windows of 32 tokens" in section
    for name, tokenizer in (("short", bpe), ("long", gpt2)):
        model, _, _ = checkpoint.load_model(tmp_path / name)
        expected = Evaluator.from_data(DATA, tokenizer, 32, batch_size=4, max_batches=2).evaluate(model)
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert row == (f"| `{name}` | {expected.text_bytes:,} | {expected.loss:.4f} | {expected.bits_per_byte:.4f} "
                       f"| {expected.nats_per_gpt2_token:.4f} |")  # fmt: skip
    at_own_context = Evaluator.from_data(DATA, gpt2, 64, batch_size=4, max_batches=2).evaluate(model)
    assert f"{at_own_context.bits_per_byte:.4f}" not in row  # the 64-token model was scored at 32, not its own


def test_compare_scores_in_sliding_windows_as_eval_does(tmp_path, bpe, capsys):
    make_run(tmp_path / "a", bpe, 32, seed=1)
    make_run(tmp_path / "b", bpe, 32, seed=2)
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]
    assert cli.main([*args, "--data", str(DATA), "--max-batches", "2", "--batch-size", "4", "--stride", "8"]) == 0
    section = (tmp_path / "cmp" / "report.md").read_text().split("## On the same data")[1]
    assert "in windows of 32 tokens, each scored 8 targets at a time" in section
    model, _, _ = checkpoint.load_model(tmp_path / "b")
    expected = Evaluator.from_data(DATA, bpe, 32, batch_size=4, max_batches=2, stride=8).evaluate(model)
    plain = Evaluator.from_data(DATA, bpe, 32, batch_size=4, max_batches=2).evaluate(model)
    row = next(line for line in section.splitlines() if line.startswith("| `b` |"))
    assert f"| {expected.loss:.4f} | {expected.bits_per_byte:.4f} |" in row and f"{plain.loss:.4f}" not in row
    # a stride that does not divide the context, or one without --data: one line, exit 2, no report written
    for extra in (["--data", str(DATA), "--stride", "5"], ["--stride", "8"]):
        capsys.readouterr()
        assert cli.main([*args[:-1], str(tmp_path / "bad"), *extra]) == 2
        assert "stride" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_compare_without_data_scores_nothing(tmp_path, bpe):
    make_run(tmp_path / "a", bpe, 32, seed=1)
    make_run(tmp_path / "b", bpe, 32, seed=2)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    assert "On the same data" not in (tmp_path / "cmp" / "report.md").read_text()
