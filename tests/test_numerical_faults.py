"""A non-finite loss or gradient skips the step (counted in the metrics); K in a row stop the run."""

import json
from pathlib import Path

import pytest
import torch
from conftest import sample

from gpt_tinystories import checkpoint
from gpt_tinystories.cli import main
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.trainer import train

TINY = dict(preset="1M", d_model=32, n_layer=2, n_head=4, context_length=64, dropout=0.1, batch_size=4,
            tokens_per_step=512, warmup_steps=2, lr=3e-3, eval_every=100, eval_batches=2, log_every=1,
            sample_tokens=4, precision="fp32", checkpoint_every=1, keep_last=100)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, bpe):
    return str(bpe.save(tmp_path_factory.mktemp("tok")))


def train_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def trajectory(records):
    """What a resumed run must reproduce exactly, as text: NaN compares unequal to itself, its text does not."""
    return json.dumps([[r[k] for k in ("step", "loss", "lr", "grad_norm", "skipped_steps")] for r in records])


@pytest.fixture
def poison_step_5():
    """Make the embedding of the 5th training step's first batch NaN, as a bad kernel or a flipped bit would.

    A global forward hook (public PyTorch API) sees every embedding call: the 9th one is step 5's first
    micro-step (2 micro-steps a step, no evaluation before it). Its token ids are remembered, so a resumed
    run, which makes fewer calls, is poisoned at the same batch."""
    calls, poisoned = [], []

    def hook(module, inputs, output):
        if not isinstance(module, torch.nn.Embedding) or inputs[0].dim() != 2:  # token embeddings only
            return None
        calls.append(1)
        if len(calls) == 9 and not poisoned:
            poisoned.append(inputs[0].clone())
        if poisoned and torch.equal(inputs[0], poisoned[0]):
            return output * float("nan")
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield poisoned
    handle.remove()


def test_a_nan_step_is_skipped_counted_and_resumed_exactly(tmp_path, tokenizer_file, poison_step_5):
    config = TrainConfig(**TINY, data=str(sample("validation-first1000.txt")), tokenizer=tokenizer_file, max_steps=8)
    result = train(config, tmp_path / "run", progress=False)
    assert result.step == 8 and poison_step_5
    records = train_records(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert str(records[4]["loss"]) == "nan" and all(str(r["loss"]) != "nan" for r in records[5:])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 5: non-finite loss or gradient, update skipped (1 in a row)" in log
    # No update at step 5: AdamW took 7 steps in 8, and no checkpoint holds the skipped step's state.
    state = checkpoint.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-000008")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}
    assert not (tmp_path / "run" / "checkpoints" / "step-000005").exists()
    assert checkpoint.load_meta(tmp_path / "run" / "checkpoints" / "step-000008")["skipped_steps"] == 1
    # Resumed from before the bad step, the run skips the same step and ends on the same weights.
    final = (tmp_path / "run" / "checkpoints" / "step-000008" / "model.safetensors").read_bytes()
    for step in (6, 7, 8):
        checkpoint._remove_dir(tmp_path / "run" / "checkpoints" / f"step-{step:06d}")
    train(config, tmp_path / "run", progress=False)
    assert trajectory(train_records(tmp_path / "run")) == trajectory(records)
    assert (tmp_path / "run" / "checkpoints" / "step-000008" / "model.safetensors").read_bytes() == final


def test_k_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tokenizer_file, capsys):
    # lr 1e30: the first update blows the weights up to ~1e30, and every later forward pass overflows to NaN.
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["train", "--out", str(tmp_path / "run"), "--data", str(sample("validation-first1000.txt")),
                 "--tokenizer", tokenizer_file, *flags, "--lr", "1e30", "--max-steps", "50",
                 "--max-bad-steps", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "training stopped at step 4: 3 steps in a row had a non-finite loss or gradient" in err
    assert "the last good checkpoint is" in err and "step-000001" in err and "lower lr" in err
    assert [p.name for p in checkpoint.step_dirs(tmp_path / "run")] == ["step-000001"]
    assert [r["skipped_steps"] for r in train_records(tmp_path / "run")] == [0, 1, 2, 3]


def test_a_training_step_reads_nothing_back_on_the_host(tmp_path, tokenizer_file, monkeypatch):
    """On a GPU every read of a device value makes the host wait: the skip is decided on the device, and the
    flags are read only at log steps. Counted here on a CPU, where such reads are the same Python calls."""
    from gpt_tinystories import trainer as train_module

    reads, inside = [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            if inside:
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_step = train_module.train_step

    def step(*args):
        inside.append(1)
        try:
            return original_step(*args)
        finally:
            inside.pop()

    monkeypatch.setattr(train_module, "train_step", step)
    settings = {**TINY, "log_every": 100, "checkpoint_every": None}
    config = TrainConfig(
        **settings, data=str(sample("validation-first1000.txt")), tokenizer=tokenizer_file, max_steps=4
    )
    assert train(config, tmp_path / "run", progress=False).step == 4
    assert reads == []


def test_bad_steps_stop_the_run_soon_even_between_distant_log_steps(tmp_path, tokenizer_file, monkeypatch):
    """The skip flags wait on the device until read, but never longer than max_bad_steps steps: a run that logs
    rarely still stops soon after the streak, and the flags it holds stay few."""
    from gpt_tinystories import trainer as train_module
    from gpt_tinystories.errors import UserError

    steps, original_step = [], train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *args: steps.append(1) or original_step(*args))
    settings = {**TINY, "log_every": 1000, "eval_every": 1000, "checkpoint_every": None, "lr": 1e30}
    config = TrainConfig(**settings, data=str(sample("validation-first1000.txt")), tokenizer=tokenizer_file,
                         max_steps=50, max_bad_steps=3)  # fmt: skip
    with pytest.raises(UserError, match="training stopped at step 4: 3 steps in a row"):
        train(config, tmp_path / "run", progress=False)
    assert len(steps) <= 6  # read every 3 steps: the streak (steps 2-4) is seen at step 6 at the latest
