"""Run dirs written before the trainer was split into components (gpt-tinystories af5ae44) still load and resume.

tests/fixtures/run-af5ae44 is a tiny run dir written by that version (tests/fixtures/make_old_run.sh: 6 steps,
checkpoints at 3 and 6, keep_last 1); run-af5ae44.json holds what the same old version computed from it,
including its own continuation to step 10. Floating-point results are bit-identical only on a machine that
computes like the one that wrote them, so exact equality is asserted when this machine reproduces the old
logits exactly (the machine that made the fixture does), and a tight tolerance otherwise.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sample

from gpt_tinystories import checkpoint, evaluate
from gpt_tinystories.checkpoint import RunMeta, load_model
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.trainer import train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "run-af5ae44.json").read_text())
# The flags make_old_run.sh trained with, as a user would pass them again to resume.
FLAGS = dict(preset="1M", data="stories.txt", tokenizer="bpe-512", d_model=16, n_layer=1, n_head=2, context_length=32,
             dropout=0.1, batch_size=4, tokens_per_step=256, warmup_steps=2, lr=0.003, eval_every=3, eval_batches=2,
             log_every=1, sample_tokens=8, precision="fp32", keep_last=1, seed=7)  # fmt: skip


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A copy of the old run dir, beside the data it was trained on (under the relative name it recorded)."""
    shutil.copytree(FIXTURES / "run-af5ae44", tmp_path / "old-run")
    shutil.copy(sample("validation-first1000.txt"), tmp_path / "stories.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "old-run"


def same_numerics(model, tokenizer) -> bool:
    """Whether this machine computes the old model's logits exactly as the machine that wrote the fixture."""
    prompt = [tokenizer.eos_id, *tokenizer.encode(EXPECTED["prompt"])]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1, :8].tolist()
    torch.testing.assert_close(torch.tensor(logits), torch.tensor(EXPECTED["last_logits_first8"]), atol=1e-5, rtol=0)
    return logits == EXPECTED["last_logits_first8"]


def test_an_old_checkpoint_loads_with_its_metadata(old_run):
    folder = old_run / "checkpoints" / "step-000006"
    model, tokenizer, meta = load_model(folder)
    assert meta["step"] == 6 and meta["path"] == str(folder)
    typed = RunMeta.read(folder)
    assert (typed.step, typed.tokens, typed.precision, typed.format) == (6, 6 * 256, "fp32", 1)
    assert typed.model_config == model.config and model.config.d_model == 16 and model.config.vocab_size == 512
    assert typed.tokenizer.hash == tokenizer.hash and typed.train_settings("old").seed == 7
    assert typed.best_val_loss == typed.val_loss is not None
    same_numerics(model, tokenizer)
    prompt = [tokenizer.eos_id, *tokenizer.encode(EXPECTED["prompt"])]
    (greedy,) = generate(model, [prompt], 12, Sampling(temperature=0), tokenizer.eos_id)
    assert greedy == EXPECTED["greedy_ids"]
    assert load_model(old_run)[2]["path"] == str(old_run / "checkpoints" / "best")  # a run dir means its best


@pytest.fixture
def fixture_threads():
    """The fixture's threads: the old version wrote it on 2 cores with torch's default, 2 threads. A sum split over
    another count (1, a pytest-xdist worker's share of 2 cores) adds in another order: an Intel Xeon with AVX-512
    then computed the continued losses to the bit but not the weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_an_old_run_resumes_where_it_stopped(old_run, monkeypatch, fixture_threads):
    # the old version validated on the first eval_batches batches, the new one on as many windows spread over the
    # data (evaluate.scored_windows): given the old windows, it must compute the old figures
    monkeypatch.setattr(evaluate, "scored_windows", lambda total, size, batches: np.arange(min(total, size * batches)))
    old_metrics = (old_run / "metrics.jsonl").read_text().splitlines()
    old_meta = json.loads((old_run / "checkpoints" / "step-000006" / "meta.json").read_text())
    model, tokenizer, _ = load_model(old_run / "checkpoints" / "step-000006")
    exact = same_numerics(model, tokenizer)

    result = train(TrainConfig(**FLAGS, max_steps=10), old_run, resume=True, progress=False)

    assert result.step == 10
    lines = (old_run / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(old_metrics)] == old_metrics  # what led up to the checkpoint is kept as it was
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    continued = EXPECTED["continued_to_step_10"]
    losses = {str(r["step"]): r["loss"] for r in records if r["kind"] == "train" and r["step"] > 6}
    assert losses == pytest.approx(continued["train_losses"], rel=1e-4)
    # A CPU can compute the probe's logits to the bit and a training step's not (seen on an AMD Zen 4, 1e-7 apart):
    # bit-exact figures and weights are asserted where the continued losses came out exact too.
    exact = exact and losses == continued["train_losses"]
    val_9 = next(r["val_loss"] for r in records if r["kind"] == "eval" and r["step"] == 9)
    assert val_9 == (continued["val_loss_step_9"] if exact else pytest.approx(continued["val_loss_step_9"], rel=1e-4))
    final = old_run / "checkpoints" / "step-000010"
    if exact:  # the very weights the old version reached when it continued this run itself
        assert hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest() == continued["model_sha256"]
    # the new checkpoint's metadata has the old one's keys and format, so older readers (which read keys by name)
    # still read it; the one key added since records what a resumed run took from the old one
    new_meta = json.loads((final / "meta.json").read_text())
    assert [k for k in new_meta if k not in ("attention_precision", "dropout_mask")] == list(old_meta)
    assert new_meta["format"] == old_meta["format"] and new_meta["attention_precision"] == "fp32"
    assert new_meta["dropout_mask"] == "bernoulli"  # it continued with the old version's dropout draws
    assert [p.name for p in checkpoint.step_dirs(old_run)] == ["step-000010"]
