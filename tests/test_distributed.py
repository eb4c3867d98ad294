"""Data-parallel training with torchrun on CPU (gloo, 2 processes, DDP and FSDP2) against a single process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sample
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
