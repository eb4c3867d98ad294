"""CPU attention in bf16 against fp32: causal SDPA, forward + backward, at the shapes the recipes train.

    python benchmarks/attention_dtype.py

bf16 autocast hands attention bf16 queries, keys and values. Three ways to run it: fp32 throughout, bf16
throughout, and bf16 inputs cast to fp32 for the kernel and back. Best of 3 alternating rounds of 6 calls each;
the header names the CPU and whether it has native bf16. Which of the last two is faster depends on the shape:
under bf16, training measures it at the start of a run and keeps the faster (trainer.choose_precision).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_description  # noqa: E402

SHAPES = {  # (batch, heads, time, head size)
    "cpu-10min recipe (6 heads of 32, context 256)": (16, 6, 256, 32),
    "8M preset (16 heads of 16, context 512)": (8, 16, 512, 16),
    "1M preset (16 heads of 4, context 512)": (16, 16, 512, 4),
    "1M preset at context 256": (16, 16, 256, 4),
}


def milliseconds(shape: tuple[int, ...], dtype: torch.dtype, cast: bool, calls: int = 6) -> float:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

    def call() -> None:
        inputs = [t.float() for t in (q, k, v)] if cast else (q, k, v)
        F.scaled_dot_product_attention(*inputs, is_causal=True).to(dtype).sum().backward()

    call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    print(f"cpu: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("causal SDPA, forward + backward, ms per call (best of 3)")
    ways = {
        "fp32": (torch.float32, False),
        "bf16": (torch.bfloat16, False),
        "bf16 cast to fp32": (torch.bfloat16, True),
    }
    for name, shape in SHAPES.items():
        rounds = [{way: milliseconds(shape, *setup) for way, setup in ways.items()} for _ in range(3)]  # alternating
        times = {way: min(r[way] for r in rounds) for way in ways}
        cells = ", ".join(f"{way} {ms:.1f}" for way, ms in times.items())
        print(f"  {name}: {cells}; bf16 / cast {times['bf16'] / times['bf16 cast to fp32']:.2f}x")


if __name__ == "__main__":
    main()
