"""The judge's cost: 44 prompts x 10 samples x 200 new tokens for the 1M preset (goal: under 60 s on 2 cores).

    python benchmarks/judge_throughput.py [--preset 1M] [--batch-sizes 110 440] [--baseline-stories 44] [--device cpu]

A randomly initialised model (4096-token BPE trained on the shared sample, context 512) never ends a story, so
every completion runs its full 200 tokens: the worst case. It times, side by side in one process:
  - the judge's batched generation (`judge._generate`, all 440 completions) at each --batch-sizes;
  - the baseline a notebook would write: one `Storyteller.generate()` call per completion, on the first
    --baseline-stories completions (the whole set would take minutes), as tokens/s;
  - the offline metrics of the 440 completions with the shared sample's 8-gram index (built beforehand).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt_tinystories.data import iter_stories
from gpt_tinystories.generate import Sampling, Storyteller, generate
from gpt_tinystories.judge import JudgeConfig, _generate, _measure
from gpt_tinystories.ngram_index import build
from gpt_tinystories.prompts import load_prompts
from gpt_tinystories.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from random_init import SAMPLE, write_random_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1M")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[110, 440])
    parser.add_argument("--baseline-stories", type=int, default=44)
    parser.add_argument("--device", default="cpu", help="cpu (the goal's setting), or cuda for a GPU check")
    args = parser.parse_args()
    from gpt_tinystories import load

    prompts, _ = load_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer.train(iter_stories(SAMPLE), 4096)
        write_random_run(Path(tmp) / "run", args.preset, 512, 0, tokenizer)
        teller = load(str(Path(tmp) / "run"), args.device)
        index = build(SAMPLE, Path(tmp) / "index", progress=False)
        print(f"{args.preset} preset, random init ({teller.model.num_parameters():,} parameters), "
              f"{len(prompts)} prompts x {args.samples} samples x {args.max_new_tokens} new tokens, "
              f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
        rates = {}
        for batch_size in args.batch_sizes:
            config = JudgeConfig(samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                 progress=False)  # fmt: skip
            started = time.perf_counter()
            completions = _generate(teller, prompts, config)
            seconds = time.perf_counter() - started
            tokens = sum(c.tokens for c in completions)
            rates[batch_size] = tokens / seconds
            print(f"judge, batch {batch_size:>4}: {len(completions)} completions, {tokens:,} tokens in {seconds:.1f} s "
                  f"= {tokens / seconds:,.0f} tokens/s")  # fmt: skip
        started = time.perf_counter()
        _measure(completions, index, config)
        print(f"offline metrics of {len(completions)} completions (8-gram index of the sample): "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        print(
            f"baseline, one completion at a time, as Storyteller.generate() ({args.baseline_stories} completions):",
            end=" ",
        )
        baseline = _baseline(teller, prompts, args)
        print(f"{baseline:,.0f} tokens/s")
        for batch_size, rate in rates.items():
            print(f"  batch {batch_size}: {rate / baseline:.1f}x the baseline")


def _baseline(teller: Storyteller, prompts: list[str], args: argparse.Namespace) -> float:
    """What Storyteller.generate() does for one completion, counting the tokens it generates."""
    tokens, started = 0, time.perf_counter()
    for i in range(args.baseline_stories):
        row = teller.encode_prompt(prompts[i % len(prompts)])
        generator = torch.Generator(teller.model.wte.weight.device).manual_seed(i)
        (out,) = generate(teller.model, [row], args.max_new_tokens, Sampling(1.0), teller.tokenizer.eos_id, generator)
        tokens += len(out)
    return tokens / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
