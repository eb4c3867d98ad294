"""GPU check for the trainer's components: a run interrupted and resumed on CUDA against an uninterrupted one.

    python benchmarks/gpu_resume_check.py [--device cuda] [--steps 40] [--precision auto|bf16|fp32]

The CPU tests prove bit-exact resume on a CPU; on CUDA this script exercises what only a GPU run reaches: the
`Checkpointer` saving and restoring the CUDA RNG state, bf16 autocast chosen for CUDA, fused AdamW and the
step loop on a GPU. It trains a small model (d_model 128, 4 layers, context 128) for --steps steps
uninterrupted, then again stopped at half-way and resumed, and prints both loss curves' largest difference and
whether the final weights are equal. CUDA kernels need not be deterministic (e.g. the embedding's backward adds
atomically), so a tiny difference is not a failure; a large one (or a resume that starts from the wrong state)
is. It reads the shared TinyStories sample, or generates plain text when the sample is not there. ~1 min on
an H100.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SAMPLE = Path(os.environ.get("TINYSTORIES_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared/data/tinystories"))


def stories(folder: Path) -> Path:
    """The shared validation sample, or ~1 MB of generated stories where it is missing."""
    if (SAMPLE / "validation-first1000.txt").is_file():
        return SAMPLE / "validation-first1000.txt"
    rng = random.Random(0)
    names, things = ["Lily", "Tom", "Sue", "Ben", "Max"], ["ball", "cat", "tree", "boat", "cake", "dog"]
    texts = [" ".join(f"{rng.choice(names)} saw a {rng.choice(things)} and was happy." for _ in range(12))
             for _ in range(2000)]  # fmt: skip
    path = folder / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(texts))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from gpt_tinystories.config import TrainConfig
    from gpt_tinystories.trainer import train

    folder = Path(tempfile.mkdtemp(prefix="gpu-resume-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # removed even when a check fails
    half = args.steps // 2
    config = TrainConfig(preset="1M", data=str(stories(folder)), tokenizer="bpe-1024", d_model=128, n_layer=4,
                         n_head=4, context_length=128, dropout=0.1, batch_size=16, tokens_per_step=4096,
                         warmup_steps=5, lr=2e-3, max_steps=args.steps, eval_every=half, eval_batches=4,
                         log_every=1, sample_tokens=16, precision=args.precision, device=args.device)  # fmt: skip
    started = time.perf_counter()
    full = train(config, folder / "full", progress=False)
    # "auto" precision is timed on a CPU, where a near-tie can pick the other one: the second run takes the first's
    config = replace(config, precision=json.loads((folder / "full" / "config.json").read_text())["precision"])
    # Interrupt the second run as the CPU test does: train it whole, then drop every checkpoint after `half`, so
    # the resume starts from step `half` with the same config (a run stopped by max_steps=half would have decayed
    # its learning rate over half the steps: a different run, not an interrupted one).
    train(config, folder / "resumed", progress=False)
    for late in (folder / "resumed" / "checkpoints").glob("step-*"):
        if int(late.name.split("-")[1]) > half:
            shutil.rmtree(late)
    resumed = train(config, folder / "resumed", resume=True, progress=False)
    seconds = time.perf_counter() - started
    a, b = losses(folder / "full"), losses(folder / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, args.steps + 1)), "a step is missing or repeated"
    worst = max(abs(a[s] - b[s]) for s in a)
    final = f"checkpoints/step-{args.steps:06d}/model.safetensors"
    wa, wb = load_file(folder / "full" / final), load_file(folder / "resumed" / final)
    weights_diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    precision = json.loads((folder / "full" / "config.json").read_text())["precision"]
    print(f"device {device}, torch {torch.__version__}, precision {precision}")
    print(f"{args.steps} steps uninterrupted vs stopped at {half} and resumed ({seconds:.1f} s for all three runs)")
    print(f"  losses at steps 1..{half} identical: {all(a[s] == b[s] for s in range(1, half + 1))}")
    first = f"first resumed step: {a[half + 1]:.6f} vs {b[half + 1]:.6f}"
    print(f"  largest |loss difference| after the resume: {worst:.3g} ({first})")
    print(f"  final weights equal: {weights_diff == 0.0} (largest difference {weights_diff:.3g})")
    print(f"  final val loss {full.val_loss:.4f} vs {resumed.val_loss:.4f}")


if __name__ == "__main__":
    main()
