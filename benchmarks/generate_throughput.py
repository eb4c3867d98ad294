"""Generation throughput: our decode engine (eager and with a compiled decode step) against Hugging Face
`generate()` on the same weights.

    python benchmarks/generate_throughput.py [--presets 1M 8M] [--new-tokens 200] [--device auto] [--runners ...]

For each preset, a randomly initialised model (4096-token vocabulary; speed does not depend on the weights)
decodes greedily from the same 16-token prompts at batch 1 and batch 8, exactly `--new-tokens` tokens each (no
EOS), every runner in turn over `--rounds` rounds; the best round of each is reported, with its ratio to
transformers' `generate()` and whether it produced the same tokens. Each runner is set up once per preset and
batch, outside the timing (the compiled step's compile time is printed beside the table).

Runners are a list of named setups (RUNNERS below): add a row source by appending one. On CUDA the compiled
step runs as CUDA graphs (torch.compile mode reduce-overhead).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.engine import Engine, Sampling
from gpt_tinystories.model import GPT
from gpt_tinystories.runtime import pick_device

Decode = Callable[[torch.Tensor, int], list[list[int]]]  # (prompts (batch, 16), new tokens) -> new tokens per row


@dataclass
class Setup:
    """What a runner gets: our model (in --dtype), the preset, the batch and the new-token count."""

    model: GPT
    preset: str
    batch: int
    new_tokens: int
    dtype: str


@dataclass
class Runner:
    name: str
    setup: Callable[[Setup], Decode]  # may raise: the row then says why it could not run
    baseline: bool = False


def hf_runner(setup: Setup) -> Decode:
    from gpt_tinystories.hf import to_transformers

    theirs = to_transformers(copy.deepcopy(setup.model).float())  # transformers in fp32, whatever our dtype

    @torch.inference_mode()
    def decode(prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, prompts.shape[1] :].tolist()

    return decode


def engine_runner(compile: bool) -> Callable[[Setup], Decode]:
    def setup(setup: Setup) -> Decode:
        # one engine, reused by every round (as a server does): slots for the batch, room for prompt + new tokens
        engine = Engine(setup.model, setup.batch, capacity=16 + setup.new_tokens, compile=compile)
        if compile:
            seconds = engine.warm_up()
            print(f"  ({setup.preset}, batch {setup.batch}: compiling the decode step took {seconds:.1f} s)")

        def decode(prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
            sequences = [engine.add(row, new_tokens, Sampling(temperature=0)) for row in prompts.tolist()]
            while engine.busy:
                engine.step()
            return [s.generated for s in sequences]

        return decode

    return setup


RUNNERS = [
    Runner("HF generate()", hf_runner, baseline=True),
    Runner("ours eager", engine_runner(compile=False)),
    Runner("ours compiled", engine_runner(compile=True)),
]


def timed(decode: Decode, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = decode(prompts, new_tokens)
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def measure(runners: list[Runner], model: GPT, preset: str, batch: int, args, device) -> dict[str, tuple]:
    """{runner name: (tokens/s, tokens) or (None, why it could not run)} for one preset and batch."""
    prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
    decoders: dict[str, Decode] = {}
    results: dict[str, tuple] = {}
    for runner in runners:
        try:
            decoders[runner.name] = runner.setup(Setup(model, preset, batch, args.new_tokens, args.dtype))
            timed(decoders[runner.name], prompts, 4)  # warm-up (and first-call allocations) outside the timing
        except Exception as error:  # a runner this machine cannot run (a missing package, say): its cell says why
            results[runner.name] = (None, f"{type(error).__name__}: {error}"[:80])
    best = {name: float("inf") for name in decoders}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):  # alternating, so that drifting machine load spreads over every runner
        for name, decode in decoders.items():
            seconds, tokens[name] = timed(decode, prompts, args.new_tokens)
            best[name] = min(best[name], seconds)
    for name in decoders:
        results[name] = (batch * args.new_tokens / best[name], tokens[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1M", "8M"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="our model's dtype (HF: fp32)")
    parser.add_argument("--runners", nargs="+", help=f"a subset of: {', '.join(r.name for r in RUNNERS)}")
    args = parser.parse_args()
    device = pick_device(args.device)
    runners = [r for r in RUNNERS if not args.runners or r.name in args.runners or r.baseline]
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}{f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else ''}")  # fmt: skip
    print(f"greedy decoding of {args.new_tokens} new tokens after a 16-token prompt; best of {args.rounds} rounds; "
          f"ours in {args.dtype}, HF in fp32; tokens/s (ratio to HF generate(), same tokens as HF)")  # fmt: skip
    baseline = next(r.name for r in runners if r.baseline)
    print(f"{'preset':<7} {'batch':>5} " + " ".join(f"{r.name:>28}" for r in runners), flush=True)
    for preset in args.presets:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = GPT(ModelConfig.from_preset(preset, 4096)).to(device, dtype).eval()
        for batch in args.batches:
            print_row(preset, batch, measure(runners, model, preset, batch, args, device), runners, baseline)


def print_row(preset: str, batch: int, results: dict[str, tuple], runners: list[Runner], baseline: str) -> None:
    base_rate, base_tokens = results[baseline]
    cells = []
    for runner in runners:
        rate, tokens = results[runner.name]
        if rate is None:
            cells.append(f"{'n/a (' + tokens + ')':>28}"[:28])
        elif runner.baseline:
            cells.append(f"{rate:>17,.0f} tok/s     ")
        else:
            ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
            same = "same" if tokens == base_tokens else "DIFFERENT"
            cells.append(f"{rate:>10,.0f} tok/s {ratio:>6} {same:>5}")
    print(f"{preset:<7} {batch:>5} " + " ".join(f"{c:>28}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
