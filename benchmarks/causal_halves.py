"""CPU causal attention in halves (attention.CausalHalves) against one causal SDPA call.

    python benchmarks/causal_halves.py [--rounds 3]

Three measurements, each the best of alternating rounds, after a warm-up; the header names the CPU:
1. what PyTorch's CPU flash kernel skips: causal against unmasked SDPA, forward + backward, at the same tokens in
   windows of 128 to 2,048 (8 × 512 tokens, 16 heads of 16);
2. one layer's attention, forward + backward, on views of one qkv projection as the model calls it, at the
   presets' and the recipe's shapes: SDPA, the halves, and what `attention = auto` would choose there
   (attention.choose_causal_kernel);
3. the whole model, forward + backward of one batch (loss included), with SDPA and with the halves, in fp32 and
   under bf16 autocast with attention in fp32.
"""

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_description  # noqa: E402

from gpt_tinystories.attention import CAUSAL_KERNELS, choose_causal_kernel, on_projection  # noqa: E402
from gpt_tinystories.config import ModelConfig  # noqa: E402
from gpt_tinystories.model import GPT  # noqa: E402

SHAPES = {  # name: (batch, heads, time, head size), model config
    "1M preset, context 512": ((16, 16, 512, 4), {"d_model": 64, "n_layer": 8, "n_head": 16}),
    "8M preset, context 512": ((8, 16, 512, 16), {"d_model": 256, "n_layer": 8, "n_head": 16}),
    "cpu-10min recipe (4 heads of 32, context 256)": (
        (16, 4, 256, 32), {"d_model": 128, "n_layer": 4, "n_head": 4, "position": "rope"}
    ),
}  # fmt: skip
SDPA, HALVES = CAUSAL_KERNELS["sdpa"], CAUSAL_KERNELS["blocked"]


def best_ms(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Each call's fastest time over `rounds` alternating rounds, after one warm-up round."""
    best = dict.fromkeys(calls, float("inf"))
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_:
                best[name] = min(best[name], (time.perf_counter() - started) * 1000)
    return best


def forward_backward(kernel: Callable, *inputs: object) -> None:
    kernel(*inputs).sum().backward()


def train_step(model: GPT, tokens: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # attention in fp32: the model's default on a CPU
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()


def skipped(rounds: int) -> None:
    print("1. causal against unmasked SDPA, 8 x 512 tokens, 16 heads of 16, fp32, forward + backward, ms")
    for time_ in (128, 256, 512, 1024, 2048):
        q, k, v = (torch.randn(4096 // time_, 16, time_, 16, requires_grad=True) for _ in range(3))
        calls = {"causal": functools.partial(forward_backward, SDPA, q, k, v),
                 "unmasked": functools.partial(forward_backward, F.scaled_dot_product_attention, q, k, v)}  # fmt: skip
        times = best_ms(calls, rounds)
        print(f"  windows of {time_:>5}: causal {times['causal']:6.1f}, unmasked {times['unmasked']:6.1f}, "
              f"causal / unmasked {times['causal'] / times['unmasked']:.2f}")  # fmt: skip


def one_layer(rounds: int) -> None:
    print("2. one layer's attention on views of one qkv projection, fp32, forward + backward, ms")
    for name, ((batch, heads, time_, size), _) in SHAPES.items():
        qkv = torch.randn(batch, time_, 3 * heads * size, requires_grad=True)
        calls = {name: functools.partial(forward_backward, on_projection, kernel, qkv, heads) for name, kernel in
                 (("sdpa", SDPA), ("halves", HALVES))}  # fmt: skip
        times = best_ms(calls, rounds)
        choice = choose_causal_kernel((batch, heads, time_, size), torch.float32, torch.device("cpu"), 0.0)
        print(f"  {name}: SDPA {times['sdpa']:.1f}, halves {times['halves']:.1f} "
              f"({times['halves'] / times['sdpa']:.2f}x); auto chooses {choice}")  # fmt: skip


def whole_model(rounds: int) -> None:
    print("3. the whole model, forward + backward of one batch, ms")
    for name, ((batch, _, time_, _), shape) in SHAPES.items():
        tokens = torch.randint(0, 4096, (batch, time_ + 1), generator=torch.Generator().manual_seed(0))
        for precision in ("fp32", "bf16"):
            calls = {}
            for kernel in ("sdpa", "blocked"):
                torch.manual_seed(0)
                model = GPT(ModelConfig(vocab_size=4096, context_length=time_, attention=kernel, **shape))
                calls[kernel] = functools.partial(train_step, model, tokens, precision == "bf16")
            times = best_ms(calls, rounds)
            print(f"  {name}, {precision}: SDPA {times['sdpa']:.0f}, halves {times['blocked']:.0f} "
                  f"({times['blocked'] / times['sdpa']:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    skipped(args.rounds)
    one_layer(args.rounds)
    whole_model(args.rounds)


if __name__ == "__main__":
    main()
