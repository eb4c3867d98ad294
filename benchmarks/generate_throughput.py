"""Generation throughput: our KV-cache decoding against Hugging Face `generate()` on the same weights.

    python benchmarks/generate_throughput.py [--presets 1M 8M] [--new-tokens 200] [--device auto]

For each preset, a randomly initialised model (4096-token vocabulary; speed does not depend on the weights)
is copied into transformers' GPT2LMHeadModel, and both decode greedily from the same 16-token prompts at
batch 1 and batch 8, exactly `--new-tokens` tokens each (no EOS), alternating over `--rounds` rounds; the
best round of each is reported. The two must produce the same tokens; the script says if they do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.hf import to_transformers
from gpt_tinystories.model import GPT
from gpt_tinystories.runtime import pick_device


def ours_generate(model: GPT, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), new_tokens, Sampling(temperature=0))


@torch.inference_mode()
def hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1M", "8M"])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="our model's dtype (HF: fp32)")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}"
          f"{f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else ''}")  # fmt: skip
    print(f"greedy decoding of {args.new_tokens} new tokens after a 16-token prompt; best of {args.rounds} rounds; "
          f"ours in {args.dtype}, HF in fp32")  # fmt: skip
    print(f"{'preset':<7} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}  same tokens")
    for preset in args.presets:
        torch.manual_seed(0)
        ours = GPT(ModelConfig.from_preset(preset, 4096)).to(device).eval()
        theirs = to_transformers(ours)
        ours = ours.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        for batch in (1, 8):
            prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
            best = {"ours": float("inf"), "hf": float("inf")}
            for _ in range(args.rounds):
                seconds, our_tokens = timed(ours_generate, ours, prompts, args.new_tokens)
                best["ours"] = min(best["ours"], seconds)
                seconds, hf_tokens = timed(hf_generate, theirs, prompts, args.new_tokens)
                best["hf"] = min(best["hf"], seconds)
            same = hf_tokens[:, 16:].tolist() == our_tokens
            total = batch * args.new_tokens
            ours_rate, hf_rate = total / best["ours"], total / best["hf"]
            print(f"{preset:<7} {batch:>5} {ours_rate:>11,.0f} {hf_rate:>10,.0f} {ours_rate / hf_rate:>5.2f}x  {same}")


if __name__ == "__main__":
    main()
