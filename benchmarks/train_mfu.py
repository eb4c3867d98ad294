"""GPU training throughput and model FLOPs utilization (MFU), ours against Hugging Face transformers.

    python benchmarks/train_mfu.py --data PREPARED_DIR --tokenizer tokenizer.json [--presets 8M 28M]

For each preset, in fresh processes one after the other on the same GPU:
- ours: `torchrun --standalone --nproc_per_node 1 -m gpt_tinystories train` — the DDP path (nccl), bf16
  autocast and torch.compile — timed from the trainer's own per-step clock after `--warmup` steps (compilation
  included in those);
- HF: `GPT2LMHeadModel(attn_implementation="sdpa")` of the same shape, bf16 autocast, fused AdamW, the plain
  training step a transformers user writes (no compile), on the same batches.

MFU counts 6 FLOPs per parameter per token for the matrix multiplies (the tied LM head included, the
embedding lookups not) plus 12 * layers * d_model * context for attention scores and values (PaLM's
formula, full not causal), over the GPU's dense bf16 peak from its datasheet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def flops_per_token(model_config) -> float:
    matmul_params = model_config.num_parameters(non_embedding=True) + model_config.vocab_size * model_config.d_model
    return 6 * matmul_params + 12 * model_config.n_layer * model_config.d_model * model_config.context_length


def run_ours(args: argparse.Namespace, preset: str, batch_size: int, compile: bool, torchrun: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
        command = [sys.executable, *launcher, "-m", "gpt_tinystories", "train", "--preset", preset, "--data", args.data,
                   "--tokenizer", args.tokenizer, "--batch-size", str(batch_size),
                   "--tokens-per-step", str(batch_size * args.context), "--context-length", str(args.context),
                   "--max-steps", str(args.warmup + args.steps), "--eval-every", str(10**9), "--eval-batches", "1",
                   "--sample-tokens", "1", "--log-every", "10", "--precision", "bf16", "--warmup-steps", "10",
                   "--compile" if compile else "--no-compile", "--out", str(run_dir)]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=not args.verbose)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        resolved = json.loads((run_dir / "config.json").read_text())
    train = [r for r in records if r["kind"] == "train" and r["step"] >= args.warmup]
    first, last = train[0], train[-1]
    return {
        "tokens_per_second": (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"]),
        "model": resolved["model"],
        "wall_seconds": wall,
    }


def run_hf(args: argparse.Namespace, preset: str, batch_size: int) -> dict:
    import torch
    import transformers

    from gpt_tinystories.config import TrainConfig
    from gpt_tinystories.data import PreparedData, TokenWindows
    from gpt_tinystories.tokenizer import Tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of this script only
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    tokens = PreparedData.open(args.data).tokens()
    vocab_size = Tokenizer.load(args.tokenizer).vocab_size
    train_config = TrainConfig(preset=preset, data=args.data, context_length=args.context).resolved()
    model_config = train_config.model_config(vocab_size)
    hf_config = transformers.GPT2Config(
        vocab_size=model_config.vocab_size, n_positions=model_config.context_length, n_embd=model_config.d_model,
        n_layer=model_config.n_layer, n_head=model_config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=device == "cuda")
    windows = TokenWindows(tokens, args.context, seed=1337)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize()
            started = time.perf_counter()
        inputs, _ = windows.batch(step * batch_size, batch_size, device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_second": args.steps * batch_size * args.context / seconds, "model": model_config.to_dict()}


def matmul_tflops() -> float:
    """The card as found: a large bf16 matrix product on random data, median of 10 after warm-up."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times[3:])[5] / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data folder (gpt-tinystories prepare --out)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer.json it was prepared with")
    parser.add_argument("--presets", nargs="+", default=["8M", "28M"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 64], help="one per preset")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation happens here)")
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "ours-eager", "hf"],
        help="ours-1proc: compiled, one plain process instead of torchrun (no DDP wrapper)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the trainer's output")
    parser.add_argument("--hf-worker", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        print(json.dumps(run_hf(args, args.hf_worker[0], int(args.hf_worker[1]))))
        return

    import torch

    from gpt_tinystories.config import ModelConfig

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    peak = next((tflops for name, tflops in DATASHEET_BF16_TFLOPS.items() if name in gpu), None)
    measured = f"{matmul_tflops():.0f}" if torch.cuda.is_available() else "-"
    print(f"{gpu}, torch {torch.__version__}; bf16 matmul 8192^3 measured {measured} TFLOP/s, "
          f"datasheet dense peak {peak} TFLOP/s", flush=True)  # fmt: skip
    rows = []
    for preset, batch_size in zip(args.presets, args.batch_sizes, strict=True):
        for side in args.sides:
            if side == "hf":
                command = [sys.executable, __file__, *sys.argv[1:], "--hf-worker", preset, str(batch_size)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
            else:
                result = run_ours(args, preset, batch_size, compile=side != "ours-eager", torchrun=side != "ours-1proc")
            flops = flops_per_token(ModelConfig.from_dict(result["model"]))
            mfu = result["tokens_per_second"] * flops / (peak * 1e12) if peak else float("nan")
            rows.append((preset, batch_size, side, result["tokens_per_second"], mfu))
            print(f"{preset:>4} batch {batch_size:>3}x{args.context} {side:<10} {result['tokens_per_second']:>12,.0f} "
                  f"tokens/s  MFU {mfu:6.1%}  ({flops / 1e6:.1f} MFLOP/token)", flush=True)  # fmt: skip
    print("\npreset  side        tokens/s      MFU   vs HF")
    for preset, _, side, speed, mfu in rows:
        hf = next((r[3] for r in rows if r[0] == preset and r[2] == "hf"), None)
        ratio = f"{speed / hf:.2f}x" if hf else "-"
        print(f"{preset:>6}  {side:<10} {speed:>10,.0f}  {mfu:6.1%}  {ratio}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
