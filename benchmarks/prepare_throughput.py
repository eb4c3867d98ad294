"""Tokenize + prepare throughput (MB/s of story text) on the shared TinyStories sample, for both tokenizers.

    python benchmarks/prepare_throughput.py [--repeat 4]

The sample (~4.3 MB) is concatenated `--repeat` times into a temporary file so the figure is steady-state;
nothing is written beside the data. Goal: >= 10 MB/s on 2 cores (the 1.9 GB train split in < 4 minutes).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from gpt_tinystories.data import iter_stories, prepare
from gpt_tinystories.tokenizer import Tokenizer

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
FILES = ["train-head.txt", "validation-first1000.txt", "v2-gpt4-train-head.txt"]
FULL_TRAIN_BYTES = 1.92e9  # TinyStories-train.txt (V1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--sample-dir", type=Path, default=Path(os.environ.get("TINYSTORIES_SAMPLE_DIR", SAMPLE)))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        text = "\n<|endoftext|>\n".join((args.sample_dir / name).read_text() for name in FILES)
        source = Path(tmp) / "sample.txt"
        source.write_text("\n<|endoftext|>\n".join([text] * args.repeat))
        started = time.perf_counter()
        bpe = Tokenizer.train(iter_stories(args.sample_dir / "train-head.txt"), 4096)
        print(f"trained bpe-4096 on train-head.txt (2 MiB) in {time.perf_counter() - started:.2f} s")
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        print(f"input: {source.stat().st_size / 1e6:.1f} MB of text ({args.repeat}x the shared sample)")
        print(f"{'tokenizer':<10} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'full train split':>17}")
        for tokenizer in (Tokenizer.gpt2(), bpe):
            _ = tokenizer.hash  # computed once per tokenizer: keep it out of the timing
            started = time.perf_counter()
            prepared = prepare(source, tokenizer, out=Path(tmp) / tokenizer.name, progress=False)
            seconds = time.perf_counter() - started
            rate = prepared.meta["text_bytes"] / seconds
            print(
                f"{tokenizer.name:<10} {seconds:>8.2f} {rate / 1e6:>7.1f} {prepared.num_tokens / seconds / 1e6:>7.2f} "
                f"{FULL_TRAIN_BYTES / rate / 60:>13.1f} min"
            )


if __name__ == "__main__":
    main()
