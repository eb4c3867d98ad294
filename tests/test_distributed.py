"""Data-parallel training with torchrun on CPU (gloo, 2 processes, DDP and FSDP2) against a single process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sample
from fault_injection.sitecustomize import RECORD_RATES_ENV
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("ddp")
    tokenizer = bpe.save(root / "tok")
    flags = ["train", "--preset", "1M", "--data", sample("validation-first1000.txt"), "--tokenizer", tokenizer,
             "--d-model", "32", "--n-layer", "2", "--n-head", "4", "--context-length", "64", "--batch-size", "4",
             "--tokens-per-step", "512", "--max-steps", "8", "--eval-every", "4", "--eval-batches", "2",
             "--sample-tokens", "4", "--log-every", "1", "--precision", "fp32", "--keep-last", "5"]  # fmt: skip

    def launch(processes, out, *extra):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if processes == 1:
            command = [sys.executable, "-m", "gpt_tinystories"]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(processes), "-m", "gpt_tinystories"]  # fmt: skip
        result = subprocess.run([*command, *map(str, flags), *extra, "--out", str(out)], capture_output=True, text=True,
                                env=env, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result

    launch(1, root / "one")
    launch(2, root / "two")
    launch(2, root / "fsdp", "--fsdp")
    # Interrupt each after step 4 (drop its step-8 checkpoint) and resume it on another world size or sharding.
    resumes = [("two", "two-then-one", 1, []), ("one", "one-then-two", 2, []), ("fsdp", "fsdp-then-one", 1, []),
               ("one", "one-then-fsdp", 2, ["--fsdp"])]  # fmt: skip
    for source, target, processes, extra in resumes:
        shutil.copytree(root / source, root / target)
        shutil.rmtree(root / target / "checkpoints" / "step-000008")
        launch(processes, root / target, *extra)
    return root


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def weights(run_dir):
    return load_file(Path(run_dir) / "checkpoints" / "step-000008" / "model.safetensors")


@pytest.mark.parametrize("sharding", ["two", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, sharding):
    one, two = losses(runs / "one"), losses(runs / sharding)
    assert len(one) == len(two) == 8
    assert one == pytest.approx(two, abs=1e-5)
    resolved = json.loads((runs / sharding / "config.json").read_text())
    assert resolved["accumulation"] == 1 and json.loads((runs / "one" / "config.json").read_text())["accumulation"] == 2
    for name, tensor in weights(runs / "one").items():
        torch.testing.assert_close(weights(runs / sharding)[name], tensor, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "resumed, uninterrupted",
    [("two-then-one", "two"), ("one-then-two", "one"), ("fsdp-then-one", "fsdp"), ("one-then-fsdp", "one")],
)
def test_a_checkpoint_resumes_on_another_world_size(runs, resumed, uninterrupted):
    assert losses(runs / resumed) == pytest.approx(losses(runs / uninterrupted), abs=1e-5)
    assert [p.name for p in sorted((runs / resumed / "checkpoints").iterdir())] == [
        "best", "step-000004", "step-000008"
    ]  # fmt: skip
    for name, tensor in weights(runs / uninterrupted).items():
        torch.testing.assert_close(weights(runs / resumed)[name], tensor, atol=1e-5, rtol=1e-4)


def _children(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # the process is gone
            continue
    return pids


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_crashed_rank_stops_the_job_and_the_rerun_loses_nothing(tmp_path, bpe):
    """SIGKILL one of two ranks mid-run: torchrun stops the job; the same command resumes from the last
    checkpoint and ends with the weights and losses of a run that never crashed."""
    tokenizer = bpe.save(tmp_path / "tok")
    flags = ["train", "--preset", "1M", "--data", sample("validation-first1000.txt"), "--tokenizer", tokenizer,
             "--d-model", "32", "--n-layer", "2", "--n-head", "4", "--context-length", "64", "--batch-size", "4",
             "--tokens-per-step", "512", "--max-steps", "120", "--checkpoint-every", "20", "--eval-every", "1000",
             "--eval-batches", "2", "--sample-tokens", "4", "--log-every", "1", "--precision", "fp32"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "gpt_tinystories", *map(str, flags)]  # fmt: skip

    def run(out):
        return subprocess.run([*torchrun, "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)

    reference = tmp_path / "reference"
    uninterrupted = run(reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    crashed = tmp_path / "crashed"
    job = subprocess.Popen([*torchrun, "--out", str(crashed)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 90
    while not (crashed / "checkpoints" / "step-000040").exists():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its step-40 checkpoint"
        time.sleep(0.02)
    (victim,) = [pid for pid in _children(job.pid) if _rank_of(pid) == "1"]
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0, output[-3000:]
    assert not (crashed / "checkpoints" / "step-000120").exists()

    resumed = run(crashed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming from step (4|6|8|10)0\b", resumed.stdout), resumed.stdout[:2000]
    assert losses(crashed) == losses(reference)
    final = "checkpoints/step-000120/model.safetensors"
    reference_weights = load_file(reference / final)
    for name, tensor in load_file(crashed / final).items():
        assert torch.equal(tensor, reference_weights[name]), name


def test_ranks_share_one_clock_under_a_time_budget(tmp_path, bpe):
    """Under --max-time the learning rate follows the clock, so every rank must read the same one, or the replicas'
    weights drift apart. Rank 1 sleeps 50 ms after each step, outside its timed work (fault_injection's
    RecordRates): the ranks' own clocks then differ by far more than jitter; the rates they use must not."""
    tokenizer, rates = bpe.save(tmp_path / "tok"), tmp_path / "rates"
    rates.mkdir()
    flags = ["train", "--preset", "1M", "--data", sample("validation-first1000.txt"), "--tokenizer", tokenizer,
             "--d-model", "32", "--n-layer", "2", "--n-head", "4", "--context-length", "64", "--batch-size", "4",
             "--tokens-per-step", "512", "--max-time", "4s", "--warmup-steps", "0", "--eval-every", "1000",
             "--eval-batches", "2", "--sample-tokens", "4", "--precision", "fp32"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", RECORD_RATES_ENV: str(rates)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "gpt_tinystories", *map(str, flags), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = ((rates / f"rank-{rank}.txt").read_text().splitlines() for rank in (0, 1))
    assert len(zero) > 5, zero  # steps of a cosine that follows the clock
    assert len({line.split()[1] for line in zero}) == len(zero)
    assert one == zero
