"""Write a randomly initialised model as a run dir, the baseline of the judge's evidence (and of benchmarks).

    python benchmarks/random_init.py --out runs/random-1m [--preset 1M] [--context-length 512] [--seed 0]
        [--tokenizer-data ../shared/data/tinystories/train-head.txt]

The tokenizer is a 4096-token BPE trained on --tokenizer-data (as `train` does by default), so the random model
speaks the same tokens as a quick-start run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpt_tinystories import checkpoint
from gpt_tinystories.config import ModelConfig
from gpt_tinystories.data import iter_stories
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import TOKENIZER_FILE, Tokenizer

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"


def write_random_run(out: Path, preset: str, context_length: int, seed: int, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, tokenizer.vocab_size, context_length=context_length)
    model = GPT(config)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    meta = {"step": 0, "tokens": 0, "model_config": config.to_dict(), "preset": preset, "random_init_seed": seed,
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "file": TOKENIZER_FILE}}  # fmt: skip
    files = {TOKENIZER_FILE: tokenizer.backend.to_str()}
    return checkpoint.save(out / checkpoint.CHECKPOINTS / "best", model.state_dict(), meta, None, files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="1M")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-data", default=str(SAMPLE))
    args = parser.parse_args()
    tokenizer = Tokenizer.train(iter_stories(args.tokenizer_data), 4096)
    path = write_random_run(Path(args.out), args.preset, args.context_length, args.seed, tokenizer)
    print(f"random {args.preset} model -> {path}")


if __name__ == "__main__":
    main()
