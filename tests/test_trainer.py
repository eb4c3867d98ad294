import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import sample

from gpt_tinystories import checkpoint
from gpt_tinystories.config import ModelConfig, TrainConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.model import GPT
from gpt_tinystories.trainer import _Budget, auto_dropout, choose_precision, learning_rate, make_optimizers, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, bpe):
    return str(bpe.save(tmp_path_factory.mktemp("tok")))


def tiny(tokenizer_file, **overrides):
    """A model small enough to train in seconds, with dropout so the RNG state matters on resume."""
    values = dict(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=tokenizer_file,
                  d_model=32, n_layer=2, n_head=4, context_length=64, dropout=0.1, batch_size=4,
                  tokens_per_step=512, warmup_steps=3, lr=3e-3, max_steps=12, eval_every=4, eval_batches=2,
                  log_every=1, sample_tokens=8, precision="fp32")  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resumed_from_step_8(config, run_dir):
    """A run interrupted after step 8 (its newest checkpoint then), resumed to its end."""
    train(config, run_dir, progress=False)
    shutil.rmtree(run_dir / "checkpoints" / "step-000012")
    assert checkpoint.latest(run_dir).name == "step-000008"
    return train(config, run_dir, resume=True, progress=False)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, tokenizer_file):
    config = tiny(tokenizer_file)
    full = train(config, tmp_path / "full", progress=False)
    assert full.step == 12
    resumed = resumed_from_step_8(config, tmp_path / "resumed")
    step12 = tmp_path / "resumed" / "checkpoints" / "step-000012"
    assert resumed.step == 12
    losses = [r["loss"] for r in records(tmp_path / "full", "train")]
    assert [r["loss"] for r in records(tmp_path / "resumed", "train")] == losses  # exact, not approximate
    assert [r["step"] for r in records(tmp_path / "resumed", "train")] == list(range(1, 13))
    assert resumed.val_loss == full.val_loss
    assert digest(step12 / "model.safetensors") == digest(
        tmp_path / "full" / "checkpoints" / "step-000012" / "model.safetensors"
    )
    # with model.Dropout's packed CPU draws, recorded so that a later version can continue them exactly
    assert json.loads((step12 / "meta.json").read_text())["dropout_mask"] == "packed"


def test_shifted_windows_change_what_a_run_sees_and_still_resume_exactly(tmp_path, tokenizer_file):
    # 5 stories make ~14 windows of 65 tokens: 12 steps of 8 are ~7 passes, each cut at its own offset
    config = tiny(tokenizer_file, data=str(sample("fixture-5-stories.txt")), shift_windows=True)
    train(config, tmp_path / "full", progress=False)
    losses = [r["loss"] for r in records(tmp_path / "full", "train")]
    assert records(tmp_path / "full", "train")[-1]["epoch"] > 5
    resumed_from_step_8(config, tmp_path / "resumed")
    assert [r["loss"] for r in records(tmp_path / "resumed", "train")] == losses
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["shift_windows"] is True
    train(tiny(tokenizer_file, data=config.data, max_steps=1), tmp_path / "fixed", progress=False)
    fixed = [r["loss"] for r in records(tmp_path / "fixed", "train")]
    assert fixed[0] != losses[0]  # the first pass is cut at its offset too


def test_a_bf16_run_resumes_with_the_attention_precision_it_measured(tmp_path, tokenizer_file, monkeypatch):
    """Attention's precision under bf16 is measured when a run starts: a resumed run must reuse the recorded one,
    not measure again (the other one rounds differently)."""
    import shutil

    from gpt_tinystories import trainer as train_module

    config = tiny(tokenizer_file, precision="bf16", max_steps=8, dropout=0.0)  # dropout: math SDPA, fp32 inside
    monkeypatch.setattr(train_module, "choose_precision", lambda *args: ("bf16", "bf16"))
    train(config, tmp_path / "full", progress=False)
    train(config, tmp_path / "resumed", progress=False)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000008")
    monkeypatch.setattr(train_module, "choose_precision", lambda *args: ("bf16", "fp32"))
    train(config, tmp_path / "resumed", resume=True, progress=False)
    assert [r["loss"] for r in records(tmp_path / "resumed", "train")] == [
        r["loss"] for r in records(tmp_path / "full", "train")
    ]
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000008" / "meta.json").read_text())
    resolved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert (meta["precision"], meta["attention_precision"]) == ("bf16", "bf16")
    assert (resolved["precision"], resolved["attention_precision"]) == ("bf16", "bf16")


def test_a_run_resumes_with_the_causal_attention_kernel_it_measured(tmp_path, tokenizer_file, monkeypatch):
    """`attention = auto` times causal attention in halves against SDPA when a new run starts and records a win
    in the model config: a resumed run attends in halves again without measuring (the kernels round apart)."""
    from gpt_tinystories import attention
    from gpt_tinystories import trainer as train_module

    calls = []
    halves = attention.CausalHalves.apply
    monkeypatch.setattr(attention.CausalHalves, "apply", lambda *args: calls.append(1) or halves(*args))
    config = tiny(tokenizer_file, max_steps=8, dropout=0.0)
    shapes = []
    monkeypatch.setattr(train_module, "choose_causal_kernel", lambda *args: shapes.append(args[:2]) or "blocked")
    train(config, tmp_path / "full", progress=False)
    assert shapes == [((4, 4, 64, 8), torch.float32)] and calls
    train(config, tmp_path / "resumed", progress=False)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000008")
    monkeypatch.setattr(train_module, "choose_causal_kernel", lambda *args: pytest.fail("measured on resume"))
    calls.clear()
    train(config, tmp_path / "resumed", resume=True, progress=False)
    assert calls and [r["loss"] for r in records(tmp_path / "resumed", "train")] == [
        r["loss"] for r in records(tmp_path / "full", "train")
    ]
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["model"]["attention"] == "blocked"
    # document masking (auto measures per batch) or --compile: nothing measured at the start
    for changed in (replace(config, document_mask=True), replace(config, compile=True)):
        assert not train_module._measures_attention(changed.model_config(50, eos_id=0), changed)
    assert train_module._measures_attention(config.model_config(50), config)


def test_the_run_dir_holds_everything_a_user_looks_for(tmp_path, tokenizer_file):
    result = train(tiny(tokenizer_file, max_steps=40, eval_every=10, dropout=0.0), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "train.log", "checkpoints"} <= names
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["train"]["lr"] == 3e-3 and resolved["model"]["d_model"] == 32 and resolved["accumulation"] == 2
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(4096)  # it learns
    assert all(r["sample"].startswith("One day, a little girl named Lily found a needle in her room.") for r in evals)
    log = (run / "train.log").read_text()
    assert evals[-1]["sample"] in log
    # eval_batches 2 of batch 4: the log says that training's figure covers 8 windows, not all of them
    covered = re.search(r"validation on 8 of (\d+) windows spread evenly \(eval: all\)", log)
    assert covered and int(covered[1]) > 8
    assert 0.5 < evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-000030", "step-000040"]
    best = checkpoint.load_meta(run / "checkpoints" / "best")
    assert best["val_loss"] == min(r["val_loss"] for r in evals) == result.val_loss
    meta = checkpoint.load_meta(run / "checkpoints" / "step-000040")
    assert meta["tokens"] == 40 * 512 and meta["tokenizer"]["hash"] and meta["train_config"]["seed"] == 1337
    trainer_state = checkpoint.load_trainer_state(run / "checkpoints" / "step-000040")
    assert set(trainer_state) == {"optimizer", "rng"}
    # A checkpoint folder is self-contained: it carries its tokenizer, checksummed like the weights.
    from gpt_tinystories.tokenizer import Tokenizer

    for name in ("step-000040", "best"):
        folder = run / "checkpoints" / name
        assert Tokenizer.load(folder).hash == meta["tokenizer"]["hash"]
        assert set(checkpoint.load_meta(folder)["files"]) >= {"model.safetensors", "tokenizer.json"}


def test_the_logged_speed_is_the_recent_one_not_slowed_by_an_evaluation(tmp_path, tokenizer_file, monkeypatch):
    from gpt_tinystories.evaluate import Evaluator

    evaluate = Evaluator.evaluate

    def slow_evaluate(self, model):
        time.sleep(1.0)
        return evaluate(self, model)

    monkeypatch.setattr(Evaluator, "evaluate", slow_evaluate)
    train(tiny(tokenizer_file, max_steps=6, eval_every=3), tmp_path / "run", progress=False)
    speeds = {r["step"]: r["tokens_per_second"] for r in records(tmp_path / "run", "train")}
    # Averaged from the start, steps 4 and 5 would count step 3's 1-second evaluation (< 5 x 512 tokens/s);
    # timed since the evaluation, a step of this model takes milliseconds.
    assert min(speeds[4], speeds[5]) > 3000


def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, tokenizer_file):
    train(tiny(tokenizer_file, max_steps=4, eval_every=4), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "checkpoints" / "step-000004"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + bytes(10))
    model = GPT(tiny(tokenizer_file).model_config(4096))
    with pytest.raises(UserError, match="model.safetensors is damaged"):
        checkpoint.load_weights(folder, model)


def test_warmup_then_cosine_to_the_floor():
    config = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1).resolved()
    assert learning_rate(config, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(config, 9, 0.0) == pytest.approx(1e-3)
    assert learning_rate(config, 50, 0.5) == pytest.approx(0.55e-3)
    assert learning_rate(config, 100, 1.0) == pytest.approx(1e-4)


def test_warmup_stable_decay_and_constant_schedules():
    wsd = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2).resolved()
    assert learning_rate(wsd, 4, 0.0) == pytest.approx(0.5e-3)
    assert learning_rate(wsd, 50, 0.5) == learning_rate(wsd, 80, 0.8) == pytest.approx(1e-3)  # stable
    assert learning_rate(wsd, 90, 0.9) == pytest.approx(0.55e-3)  # halfway down the linear decay
    assert learning_rate(wsd, 100, 1.0) == pytest.approx(1e-4)
    constant = TrainConfig(lr=1e-3, warmup_steps=10, schedule="constant").resolved()
    assert learning_rate(constant, 4, 0.0) == pytest.approx(0.5e-3)
    assert learning_rate(constant, 100, 1.0) == pytest.approx(1e-3)
    with pytest.raises(UserError, match="schedule must be one of cosine, wsd, constant, got 'linear'"):
        TrainConfig(schedule="linear").resolved()


def test_budgets_in_steps_tokens_epochs_and_time():
    def steps(**limits):
        return _Budget(TrainConfig(warmup_steps=0, **limits).resolved(), 1000, 10, 95).total_steps

    assert steps(max_steps=7) == 7
    assert steps(max_tokens=2500) == 3
    assert steps(max_epochs=2) == 19
    assert steps(max_steps=7, max_tokens=2500) == 3  # the first limit reached
    assert steps() == 10  # default: one epoch
    timed = _Budget(TrainConfig(max_time="2m", warmup_steps=0).resolved(), 1000, 10, 95)
    assert timed.total_steps is None and timed.progress(5, 60.0) == 0.5 and timed.done(5, 120.0)
    # passes over the data: by steps, or by time at a measured speed, whichever limit comes first
    assert timed.passes(0.5) == pytest.approx(240 * 10 / 95)
    both = _Budget(TrainConfig(max_time="2m", max_steps=19).resolved(), 1000, 10, 95)
    assert both.passes(0.5) == pytest.approx(2.0) and both.passes(60.0) == pytest.approx(20 / 95)


def test_auto_dropout_is_none_for_a_few_passes_and_some_for_many():
    # the measured points (docs/study-cpu-10min.md): ~9 and ~13 passes better without, ~17 and ~30 with 0.1
    assert auto_dropout(13.0) == 0.0 and auto_dropout(16.0) == auto_dropout(30.0) == 0.1


def test_auto_dropout_trains_as_the_dropout_it_chose_and_resumes_exactly(tmp_path, tokenizer_file, monkeypatch):
    import gpt_tinystories.trainer as train_module

    # 5 stories (less the held-out part) make 10 windows of 65 tokens, 8 per step: 12 steps are ~10 passes, 4 ~3
    monkeypatch.setattr(train_module, "AUTO_DROPOUT_PASSES", 5)
    data = str(sample("fixture-5-stories.txt"))
    chosen = tiny(tokenizer_file, data=data, dropout=0.1)
    train(chosen, tmp_path / "chosen", progress=False)
    auto = tiny(tokenizer_file, data=data, dropout="auto")
    train(auto, tmp_path / "auto", progress=False)
    # the same weights and RNG stream as a run given 0.1: the same losses, to the bit
    assert [r["loss"] for r in records(tmp_path / "auto", "train")] == [
        r["loss"] for r in records(tmp_path / "chosen", "train")
    ]
    resolved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert resolved["train"]["dropout"] == "auto" and resolved["model"]["dropout"] == 0.1
    assert re.search(
        r"dropout 0.1 \(auto: ~10 passes over the data planned\).* 10 training windows",
        (tmp_path / "auto" / "train.log").read_text(),
    )
    resumed_from_step_8(auto, tmp_path / "resumed")
    assert [r["loss"] for r in records(tmp_path / "resumed", "train")] == [
        r["loss"] for r in records(tmp_path / "auto", "train")
    ]
    few = train(tiny(tokenizer_file, data=data, dropout="auto", max_steps=4, eval_every=4), tmp_path / "few",
                progress=False)  # fmt: skip
    assert json.loads((few.run_dir / "config.json").read_text())["model"]["dropout"] == 0.0
    assert "dropout 0 (auto: ~3 passes over the data planned)" in (few.run_dir / "train.log").read_text()


def test_auto_dropout_under_a_time_budget_counts_passes_at_the_measured_speed(tmp_path, tokenizer_file, monkeypatch):
    import gpt_tinystories.trainer as train_module

    timed = {}

    def fake_time_rows(model, batch, device, candidates):
        timed.update(candidates=candidates)
        return dict.fromkeys(candidates, 0.5)  # 4 x 2 rows a step: 4 s

    monkeypatch.setattr(train_module, "_time_rows", fake_time_rows)
    config = tiny(tokenizer_file, data=str(sample("fixture-5-stories.txt")), dropout="auto", max_time="28s")
    train(config, tmp_path / "run", progress=False)
    assert timed["candidates"] == [("fp32", "fp32")]  # timed in the run's precision
    # 28 s at 4 s a step are 7 steps (before max_steps' 12) of 8 windows, over the data's windows
    log = (tmp_path / "run" / "train.log").read_text()
    windows = int(re.search(r"([\d,]+) training windows", log)[1])
    assert f"~{7 * 8 / windows:.0f} passes over the data planned" in log


def test_weight_decay_applies_to_matrices_only():
    model = GPT(tiny("gpt2").model_config(100))
    (adamw,) = make_optimizers(model, TrainConfig().resolved(), torch.device("cpu"))
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(tiny("gpt2").model_config(100))
    muon, adamw = make_optimizers(model, TrainConfig(optimizer="muon").resolved(), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    matrices = {id(p) for p in muon.param_groups[0]["params"]}
    assert matrices == {id(p) for b in model.blocks for p in b.parameters() if p.dim() == 2}
    rest = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert id(model.wte.weight) in rest and not matrices & rest
    assert len(matrices | rest) == len(list(model.parameters()))


def test_measuring_precision_leaves_no_trace():
    model = GPT(tiny("gpt2").model_config(100))
    batch = (torch.randint(0, 100, (4, 64)), torch.randint(0, 100, (4, 64)))
    rng = torch.get_rng_state()
    assert choose_precision("auto", torch.device("cpu"), model, batch) in [("bf16", "bf16"), ("bf16", "fp32"),
                                                                           ("fp32", "fp32")]  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and model.cpu_attention_fp32
    assert choose_precision("bf16", torch.device("cpu"), model, batch) in [("bf16", "bf16"), ("bf16", "fp32")]
    assert choose_precision("fp32", torch.device("cpu"), model, batch) == ("fp32", "fp32")


def fake_call_times(monkeypatch, seconds: list[float]) -> Iterator[float]:
    """Make the trainer's clock say that its timed calls took `seconds`, one after the other."""
    from gpt_tinystories import trainer as train_module

    calls, clock = iter(seconds), {"now": 0.0, "started": True}

    def fake_clock():
        clock["started"] = not clock["started"]
        if clock["started"]:  # the end of a timed call
            clock["now"] += next(calls)
        return clock["now"]

    monkeypatch.setattr(train_module.time, "perf_counter", fake_clock)
    return calls


def test_precision_is_measured_over_several_rounds_so_one_slow_timing_does_not_decide(monkeypatch):
    model = GPT(tiny("gpt2").model_config(100))
    batch = (torch.randint(0, 100, (4, 64)), torch.randint(0, 100, (4, 64)))
    # seconds per forward + backward, round by round, candidates in order fp32, bf16, bf16 with fp32 attention:
    # the last is the fastest but for one slow timing in the first round after the warm-up
    fake_call_times(monkeypatch, [5.0, 5.0, 5.0, 2.0, 1.05, 3.0, 2.0, 1.05, 1.0, 2.0, 1.05, 1.0])
    assert choose_precision("auto", torch.device("cpu"), model, batch) == ("bf16", "fp32")


def test_a_candidate_five_times_as_slow_after_the_warm_up_is_timed_no_more(monkeypatch):
    """bf16 autocast on a CPU without native bf16 (~28x slower than fp32 on a Zen 3) is timed in the warm-up and
    one round, not four: 8 timed calls instead of 12. One slow timing (3x, the test above) keeps its rounds."""
    model = GPT(tiny("gpt2").model_config(100))
    batch = (torch.randint(0, 100, (4, 64)), torch.randint(0, 100, (4, 64)))
    # fp32 at 1 s a call, both bf16 candidates at 28 s (and 30 s in the warm-up)
    calls = fake_call_times(monkeypatch, [1.2, 30.0, 30.0] + [1.0, 28.0, 28.0] + [1.0] * 2)
    assert choose_precision("auto", torch.device("cpu"), model, batch) == ("fp32", "fp32")
    assert next(calls, None) is None  # every timing above was taken, and no more (a 9th would raise)


@pytest.mark.parametrize(("attention_in_bf16", "chosen"), [(0.95, "fp32"), (0.85, "bf16")])
def test_attention_runs_in_bf16_only_where_that_is_10_percent_faster(monkeypatch, attention_in_bf16, chosen):
    """A near-tie between attention in bf16 and in fp32 under bf16 autocast keeps fp32, so that runs on one
    machine do not flip between the two (they round apart)."""
    from gpt_tinystories import trainer as train_module

    seconds = {("fp32", "fp32"): 3.0, ("bf16", "bf16"): attention_in_bf16, ("bf16", "fp32"): 1.0}
    monkeypatch.setattr(train_module, "_time_rows", lambda model, batch, device, candidates: seconds)
    assert choose_precision("auto", torch.device("cpu"), None, None) == ("bf16", chosen)


def run_cli(*args, cwd=REPO, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip


def tiny_flags(tokenizer_file, out, *extra):
    return ["-m", "gpt_tinystories", "train", "--preset", "1M", "--data", sample("validation-first1000.txt"),
            "--tokenizer", tokenizer_file, "--d-model", "32", "--n-layer", "2", "--n-head", "4",
            "--context-length", "64", "--batch-size", "4", "--tokens-per-step", "256", "--eval-every", "5",
            "--eval-batches", "1", "--sample-tokens", "4", "--log-every", "1", "--precision", "fp32",
            "--out", out, *extra]  # fmt: skip


def test_sigint_checkpoints_and_the_same_command_resumes(tmp_path, tokenizer_file):
    flags = tiny_flags(tokenizer_file, tmp_path / "run", "--max-steps", "100000")
    process = run_cli(*flags)
    deadline = time.time() + 60
    while time.time() < deadline and len(records_or_empty(tmp_path / "run")) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    stopped = checkpoint.latest(tmp_path / "run")
    assert stopped is not None and "checkpoint saved" in out
    step = checkpoint.load_meta(stopped)["step"]
    assert step >= 3
    flags[flags.index("100000")] = str(step + 3)  # a budget change is allowed on resume
    process = run_cli(*flags)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert f"resuming from step {step}" in out
    assert [r["step"] for r in records(tmp_path / "run", "train")] == list(range(1, step + 4))


def records_or_empty(run_dir):
    try:
        return records(run_dir, "train")
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_the_original_command_line_still_works(tmp_path, tokenizer_file):
    process = run_cli("train.py", "--cfg_param", "1M", "--data", sample("fixture-5-stories.txt"), "--out",
                      tmp_path / "run", "--max-steps", "2", "--context-length", "32", "--batch-size", "2",
                      "--tokens-per-step", "64", "--eval-batches", "1", "--sample-tokens", "2")  # fmt: skip
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["train"]["preset"] == "1M" and resolved["train"]["tokenizer"] == "gpt2"
    assert resolved["model"]["vocab_size"] == 50257 and resolved["model"]["d_model"] == 64


def snapshot(folder):
    return {p.relative_to(folder): p.is_file() and digest(p) for p in Path(folder).rglob("*")}


BAD_RUNS = [
    (["--preset", "7M"], "unknown preset '7M'"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lr", "nan"], "lr must be finite and > 0, got nan"),
    (["--seed", "-1"], "seed must be in [0, 2**63), got -1"),
    (["--lr", "fast"], "expected a number"),
    (["--weight-decay", "inf"], "weight_decay must be finite and >= 0, got inf"),
    (["--max-steps", "-3"], "max_steps must be > 0"),
    (["--max-time", "soon"], "max_time must be a positive duration"),
    (["--n-head", "5"], "not divisible by n_head=5"),
    (["--config", "{tmp}/bad-key.toml"], "unknown key(s) learning_rate"),
    (["--config", "{tmp}/bad-type.toml"], "weight_decay must be a number, got 'lots'"),
    (["--config", "{tmp}/missing.toml"], "config file not found"),
    (["--context-length", "100000"], "fewer than one window"),
    (["--batch-size", "5000"], "batch_size 5000 exceeds"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--data", "{tmp}/prepared-gpt2"], "prepared with tokenizer gpt2"),
    (["--resume", "--out", "{tmp}/empty-run"], "holds no checkpoint"),
    (["--lr", "0.01", "--out", "{tmp}/existing-run"], "lr 0.003 -> 0.01"),
    (["--init-from", "{tmp}/existing-run", "--n-layer", "3"], "the config asks for n_layer 3 (there: 2); leave those"),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("bad")
    train(tiny(tokenizer_file, max_steps=2, eval_every=2), root / "existing-run", progress=False)
    (root / "bad-key.toml").write_text("learning_rate = 0.1\n")
    (root / "bad-type.toml").write_text('weight_decay = "lots"\n')
    from gpt_tinystories.data import prepare
    from gpt_tinystories.tokenizer import Tokenizer

    prepare(sample("fixture-5-stories.txt"), Tokenizer.gpt2(), out=root / "prepared-gpt2", progress=False)
    return root


@pytest.mark.parametrize("extra, message", BAD_RUNS)
def test_bad_training_input_gives_one_line_exit_2_and_changes_nothing(extra, message, existing_run, tokenizer_file):
    root = existing_run
    before = snapshot(root)
    extra = [e.format(tmp=root) for e in extra]
    flags = tiny_flags(tokenizer_file, root / "new-run", "--max-steps", "2", *extra)
    # argparse keeps the last --out: the bad-run cases that name one win over tiny_flags' default.
    process = run_cli(*flags, cwd=root)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err
    assert snapshot(root) == before


@pytest.mark.parametrize("first", ["", "import gpt_tinystories.cli, gpt_tinystories.trainer"])
def test_the_readme_s_import_gives_the_train_function(first):
    """`from gpt_tinystories import TrainConfig, train` gave the module train.py once anything had imported it (the
    import system binds a submodule's name in its package), not train(): the module is trainer.py now."""
    check = f"{first}\nimport inspect\nfrom gpt_tinystories import TrainConfig, train\nassert inspect.isfunction(train)"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_an_api_user_gets_the_same_errors(tokenizer_file, tmp_path):
    with pytest.raises(UserError, match="lr must be > 0"):
        train(tiny(tokenizer_file, lr=-1.0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_logging_works_offline(tmp_path, tokenizer_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny(tokenizer_file, max_steps=4, wandb=True), tmp_path / "run", progress=False)
    run_id = (tmp_path / "run" / "wandb-id.txt").read_text().strip()
    (offline_run,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline_run / f"run-{run_id}.wandb").stat().st_size > 0


def test_a_finished_run_reports_its_final_model_again(tmp_path, tokenizer_file):
    first = train(tiny(tokenizer_file, max_steps=4), tmp_path / "run", progress=False)
    again = train(tiny(tokenizer_file, max_steps=4), tmp_path / "run", progress=False)
    assert again.step == 4 and again.val_loss == first.val_loss and again.sample == first.sample
    assert again.sample.startswith("One day, a little girl named Lily")


def test_narrow_d_model_keeps_the_head_size_and_says_what_it_cannot():
    model = ModelConfig(vocab_size=100, d_model=128, n_head=4)
    narrow = TrainConfig(narrow_d_model=96).narrowed(model)
    assert (narrow.d_model, narrow.n_head, narrow.head_size) == (96, 3, 32)
    assert TrainConfig(narrow_d_model=128).narrowed(model) is None and TrainConfig().narrowed(model) is None
    grouped = TrainConfig(narrow_d_model=64).narrowed(replace(model, n_kv_head=2))
    assert (grouped.n_head, grouped.n_kv_head) == (2, 1)
    with pytest.raises(UserError, match=r"^narrow_d_model=100 must keep heads of 32 \(d_model / n_head\): use a mult"):
        TrainConfig(preset="1M", d_model=128, n_head=4, narrow_d_model=100).resolved()
    with pytest.raises(UserError, match=r"heads of 32 \(d_model / n_head\) in groups of 2: use a multiple of 64"):
        TrainConfig(narrow_d_model=96).narrowed(replace(model, n_kv_head=2))


def test_narrow_d_model_is_taken_where_a_time_budget_plans_few_passes(tmp_path, tokenizer_file, monkeypatch):
    import gpt_tinystories.trainer as train_module

    timed = []

    def fake_time_rows(model, batch, device, candidates):
        timed.append(model.config.d_model)
        return dict.fromkeys(candidates, 1.0 if slow else 1e-6)

    monkeypatch.setattr(train_module, "_time_rows", fake_time_rows)
    data = str(sample("fixture-5-stories.txt"))
    slow, timed_run = True, tiny(tokenizer_file, data=data, dropout="auto", narrow_d_model=16, max_steps=None,
                                 max_time="4s", eval_every=1000)  # fmt: skip
    train(timed_run, tmp_path / "slow", progress=False)
    assert timed == [32, 16]  # planned at the width set, then dropout "auto" at the width taken
    resolved = json.loads((tmp_path / "slow" / "config.json").read_text())["model"]
    assert (resolved["d_model"], resolved["n_head"]) == (16, 2)
    log = (tmp_path / "slow" / "train.log").read_text()
    assert "16 wide, 2 heads (narrow_d_model: ~0 passes planned at 32 wide, fewer than 12), dropout 0 (auto" in log
    # the narrowed model is the one --d-model 16 --n-head 2 builds from the same seed: the same first losses
    train(tiny(tokenizer_file, data=data, d_model=16, n_head=2, dropout=0.0, max_steps=2), tmp_path / "set",
          progress=False)  # fmt: skip
    first = [r["loss"] for r in records(tmp_path / "set", "train")]
    assert [r["loss"] for r in records(tmp_path / "slow", "train")][:2] == first

    slow, timed = False, []  # a fast CPU plans many passes: the width set, timed once for both choices
    train(timed_run, tmp_path / "fast", progress=False)
    assert timed == [32]
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["model"]["d_model"] == 32
    slow, timed = True, []  # a step budget buys no tokens by narrowing: nothing measured, the width set
    train(replace(timed_run, max_time=None, max_steps=2), tmp_path / "steps", progress=False)
    assert timed == []
    assert json.loads((tmp_path / "steps" / "config.json").read_text())["model"]["d_model"] == 32
    assert "passes planned at" not in (tmp_path / "steps" / "train.log").read_text()
    # a run made without narrow_d_model (as before it existed) resumes under it, with the shape it was given
    train(replace(timed_run, max_time=None, max_steps=2, narrow_d_model=None), tmp_path / "old", progress=False)
    resumed = train(replace(timed_run, max_time="2s"), tmp_path / "old", resume=True, progress=False)
    assert resumed.step > 2 and json.loads((tmp_path / "old" / "config.json").read_text())["model"]["d_model"] == 32
