"""RunMeta: meta.json as a typed dataclass, and the Checkpointer that writes it during training."""

import json

import pytest
import torch

from gpt_tinystories import checkpoint
from gpt_tinystories.checkpoint import Checkpointer, DamagedCheckpoint, RunMeta, TokenizerRef
from gpt_tinystories.config import ModelConfig, TrainConfig
from gpt_tinystories.errors import UserError

CONFIG = ModelConfig(vocab_size=300, d_model=16, n_layer=1, n_head=2, context_length=32)


def test_run_meta_round_trips_through_a_checkpoint_with_the_keys_meta_json_always_had(tmp_path):
    meta = RunMeta(step=4, tokens=512, train_seconds=1.5, skipped_steps=1, val_loss=2.0, best_val_loss=1.5,
                   precision="fp32", model_config=CONFIG, train_config=TrainConfig(preset="1M").to_dict(),
                   tokenizer=TokenizerRef("bpe", "abc"))  # fmt: skip
    checkpoint.save(tmp_path / "c", {"w": torch.zeros(2)}, meta.to_json())
    raw = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert list(raw) == ["format", "step", "tokens", "train_seconds", "skipped_steps", "bad_steps_in_a_row",
                         "val_loss", "best_val_loss", "precision", "attention_precision", "dropout_mask",
                         "model_config", "train_config", "tokenizer", "files"]  # fmt: skip
    again = RunMeta.read(tmp_path / "c")
    assert again == RunMeta(**{**meta.__dict__, "files": raw["files"]})
    assert again.train_settings("here") == TrainConfig(preset="1M")


def test_partial_and_newer_minor_metadata_reads(tmp_path):
    checkpoint.save(tmp_path / "c", {"w": torch.zeros(2)}, {"step": 3, "later_key": 1, "tokenizer": {"extra": 2}})
    meta = RunMeta.read(tmp_path / "c")
    assert (meta.step, meta.model_config, meta.tokenizer, meta.train_config) == (3, None, TokenizerRef(), {})


def test_bad_metadata_is_named(tmp_path):
    checkpoint.save(tmp_path / "c", {"w": torch.zeros(2)}, {"model_config": [1, 2]})
    with pytest.raises(UserError, match="has no valid model_config"):
        RunMeta.read(tmp_path / "c")
    checkpoint.save(tmp_path / "d", {"w": torch.zeros(2)}, {"step": 1, "tokenizer": 5})
    with pytest.raises(DamagedCheckpoint, match="is damaged"):
        RunMeta.read(tmp_path / "d")


def test_the_checkpointer_keeps_the_best_and_prunes(tmp_path, bpe, gpt2):
    saver = Checkpointer(tmp_path, keep_last=2)
    assert saver.resume_point(TrainConfig(), required=False) is None
    saver.start(TrainConfig(preset="1M"), CONFIG, ("fp32", "fp32"), bpe, torch.device("cpu"), "packed")
    for step, val_loss in ((1, 3.0), (2, 2.0), (3, None), (4, 2.5)):
        progress = dict(step=step, tokens=step * 10, train_seconds=float(step), skipped_steps=0, bad_steps_in_a_row=0)
        saver.save({"w": torch.full((2,), float(step))}, {"state": {}}, val_loss, **progress)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step-000003", "step-000004"]
    best = RunMeta.read(tmp_path / "checkpoints" / "best")
    assert (best.step, best.val_loss, best.best_val_loss) == (2, 2.0, 2.0)
    newest = RunMeta.read(tmp_path / "checkpoints" / "step-000004")
    assert (newest.val_loss, newest.best_val_loss, newest.tokenizer.hash) == (2.5, 2.0, bpe.hash)
    resumed = Checkpointer(tmp_path, keep_last=2)
    assert resumed.resume_point(TrainConfig(preset="1M"), required=True).step == 4 and resumed.best_val == 2.0
    bpe.save(tmp_path)
    assert resumed.resumed_tokenizer().hash == bpe.hash
    gpt2.save(tmp_path)
    with pytest.raises(UserError, match="is not the tokenizer of checkpoint .*step-000004; restore it"):
        resumed.resumed_tokenizer()
    with pytest.raises(UserError, match=r"different config \(preset '1M' -> '8M'\)"):
        Checkpointer(tmp_path, keep_last=2).resume_point(TrainConfig(preset="8M"), required=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        Checkpointer(tmp_path / "empty", keep_last=2).resume_point(TrainConfig(), required=True)
