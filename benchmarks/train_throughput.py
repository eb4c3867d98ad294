"""Training throughput: our trainer against Hugging Face transformers' GPT2LMHeadModel, side by side.

    python benchmarks/train_throughput.py [--preset 8M] [--tokenizer bpe-4096|gpt2] [--batch-size 8]
        [--document-mask] [--attention auto|sdpa|blocked|flex] [--compile] [--precision auto|bf16|fp32]

Both train the same model shape on the same batches of the shared TinyStories sample, one after the other in
fresh processes (so neither shares cores or allocator state with the other):
- ours: `gpt_tinystories.train()` end to end (data windows, autocast chosen by measurement, fused loss,
  AdamW, clipping), timed from its own per-step clock after warm-up steps;
- HF: `GPT2LMHeadModel(attn_implementation="sdpa")`, its plain training step (`loss = model(input_ids,
  labels=...).loss; backward; AdamW step`) in fp32, as a user of transformers would write it.
- ours with --document-mask as a third side: attention kept within each story (a different model, so
  named apart; the first two compute the same thing).
- a ceiling: the step's matrix products (forward and both backward products of every linear layer and the LM
  head, at the batch's token count) and its attention calls (forward + backward, every layer: causal SDPA, or on
  a CPU causal attention in halves where that is faster), timed alone in the precisions ours used, with nothing
  else, each its fastest of the timed steps. Both trainers run at least these kernels (transformers more: SDPA
  alone), so tokens over their time bounds any trainer built on PyTorch's kernels, and the
  ceiling over transformers' figure bounds the speed-up a faster trainer (rather than fewer operations or
  faster kernels) could show.
Peak memory is the peak resident set of each process (CPU) or peak allocated CUDA memory. The header names
the CPU, its vector flags (bf16 autocast pays only with native bf16) and the load average before and after:
a load above the core count means other processes shared the cores, and the figures are contended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SAMPLE = Path(os.environ.get("TINYSTORIES_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared/data/tinystories"))


def worker(args: argparse.Namespace) -> dict:
    import torch

    from gpt_tinystories.config import TrainConfig
    from gpt_tinystories.data import TokenWindows, prepare
    from gpt_tinystories.runtime import pick_device
    from gpt_tinystories.trainer import load_tokenizer, train

    data = str(SAMPLE / "train-head.txt")
    tokenizer = load_tokenizer(args.tokenizer, data)
    device = pick_device(args.device)
    steps = args.warmup + args.steps
    config = TrainConfig(preset=args.preset, data=data, batch_size=args.batch_size, context_length=args.context,
                         tokens_per_step=args.batch_size * args.context, max_steps=steps, eval_every=10**9,
                         eval_batches=1, sample_tokens=1, log_every=1, device=args.device, warmup_steps=2)  # fmt: skip
    if args.worker == "ceiling":
        return ceiling(args, config.resolved().model_config(tokenizer.vocab_size), device)
    if args.worker in ("ours", "ours-doc"):
        extra = {"attention": args.attention, "document_mask": args.worker == "ours-doc", "compile": args.compile,
                 "precision": args.precision}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_file = str(tokenizer.save(tmp))
            ours = TrainConfig(**{**config.to_dict(), "tokenizer": tokenizer_file, **extra})
            train(ours, Path(tmp) / "run", progress=False)
            lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
            resolved = json.loads((Path(tmp) / "run" / "config.json").read_text())
        precision, attention = resolved["precision"], resolved["attention_precision"]
        precision += f" (attention {attention})" if attention != precision else ""
        precision += ", attention in halves" if resolved["model"]["attention"] == "blocked" else ""
        start, end = records[args.warmup - 1], records[-1]
        tokens_per_second = (end["tokens"] - start["tokens"]) / (end["seconds"] - start["seconds"])
        result = {"tokens_per_second": tokens_per_second, "precision": precision,
                  "precisions": f"{resolved['precision']},{attention}"}  # fmt: skip
    else:
        import transformers

        model_config = config.resolved().model_config(tokenizer.vocab_size)
        hf_config = transformers.GPT2Config(
            vocab_size=tokenizer.vocab_size, n_positions=model_config.context_length, n_embd=model_config.d_model,
            n_layer=model_config.n_layer, n_head=model_config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        windows = TokenWindows(prepare(data, tokenizer, progress=False).tokens(), args.context, seed=1337)
        for step in range(steps):
            if step == args.warmup:
                started = time.perf_counter()
            inputs, _ = windows.batch(step * args.batch_size, args.batch_size)
            inputs = inputs.to(device)
            loss = model(input_ids=inputs, labels=inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        tokens_per_second = args.steps * args.batch_size * args.context / (time.perf_counter() - started)
        result = {"tokens_per_second": tokens_per_second, "precision": "fp32"}
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def ceiling(args: argparse.Namespace, model_config, device) -> dict:  # noqa: ANN001 (ModelConfig, device)
    """The time of the step's matrix products and attention calls alone (see the module docstring)."""
    import torch

    from gpt_tinystories.attention import CAUSAL_KERNELS, halves_problem
    from gpt_tinystories.model import GPT
    from gpt_tinystories.runtime import keep_freed_memory

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    matmul_dtype, attention_dtype = (dtypes[p] for p in args.ceiling_precisions.split(","))
    model = GPT(model_config)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if model.lm_head is None:
        shapes.append((model_config.d_model, model_config.vocab_size))  # tied: the embedding matrix
    rows = args.batch_size * args.context
    products = []
    for fan_in, fan_out in shapes:  # forward x @ w.T; backward dy @ w (inputs) and dy.T @ x (weights)
        x, dy = (torch.randn(rows, n, device=device, dtype=matmul_dtype) for n in (fan_in, fan_out))
        w = torch.randn(fan_out, fan_in, device=device, dtype=matmul_dtype)
        products += [(x, w.T), (dy, w), (dy.T, x)]
    layers, heads, head_size = model_config.n_layer, model_config.n_head, model_config.d_model // model_config.n_head
    q, k, v = (torch.randn(args.batch_size, heads, args.context, head_size, device=device, dtype=attention_dtype,
                           requires_grad=True) for _ in range(3))  # fmt: skip

    def timed(run: Callable[[], None]) -> float:
        """Seconds of run()'s fastest call after warm-up: a ceiling takes the kernels at their best."""
        times = []
        for _ in range(args.warmup + args.steps):
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times[args.warmup :])

    def matmuls() -> None:
        for a, b in products:
            a @ b  # each result freed at once, as in training, so the allocator hands its memory back warm

    kernels = [CAUSAL_KERNELS["sdpa"]]
    if halves_problem(device, args.context, 0.0) is None:  # on a CPU, causal attention in halves is a candidate
        kernels.append(CAUSAL_KERNELS["blocked"])

    def attention(kernel: Callable) -> Callable[[], None]:
        return lambda: [kernel(q, k, v).sum().backward() for _ in range(layers)]

    keep_freed_memory()  # as train() does
    matmul_seconds = timed(matmuls)
    attention_seconds = min(timed(attention(kernel)) for kernel in kernels)
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in products)
    return {"tokens_per_second": rows / (matmul_seconds + attention_seconds), "matmul_seconds": matmul_seconds,
            "attention_seconds": attention_seconds, "matmul_gflops": flops / matmul_seconds / 1e9}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8M")
    parser.add_argument("--tokenizer", default="bpe-4096")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; medians are shown")
    parser.add_argument("--attention", default="auto", help="our attention kernel (auto measures)")
    parser.add_argument("--document-mask", action="store_true", help="also time ours with document masking")
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile (compiles in warm-up)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="ours (auto measures); fp32 times the path a CPU without native bf16 takes")  # fmt: skip
    parser.add_argument("--worker", choices=["ours", "ours-doc", "hf", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-precisions", default="fp32,fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")  # fmt: skip
    print(f"cpu: {cpu_description()}; torch vector ISA {torch.backends.cpu.get_cpu_capability()}")
    load_before = os.getloadavg()[0]
    print(f"preset {args.preset}, tokenizer {args.tokenizer}, batch {args.batch_size}x{args.context}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps")  # fmt: skip
    sides = ["hf", "ours", *(["ours-doc"] if args.document_mask else []), "ceiling"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):  # alternate, so drifting machine load (and memory bandwidth) hits all alike
        for side in sides:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", side]
            if side == "ceiling":  # the precisions ours chose in this round
                command += ["--ceiling-precisions", runs["ours"][-1]["precisions"]]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[side].append(json.loads(output.strip().splitlines()[-1]))
    medians = {}
    names = {"hf": "transformers GPT2LMHeadModel", "ours": "gpt-tinystories", "ours-doc": "  + document mask"}
    for side, name in names.items():
        if side not in runs:
            continue
        speeds = sorted(r["tokens_per_second"] for r in runs[side])
        medians[side] = speeds[len(speeds) // 2]
        memory = max(r["peak_memory_mb"] for r in runs[side])
        print(
            f"{name:<30} {medians[side]:>8,.0f} tokens/s (runs: {', '.join(f'{s:,.0f}' for s in speeds)})  "
            f"{runs[side][0]['precision']}  peak memory {memory:,.0f} MB"
        )
    bound = sorted(runs["ceiling"], key=lambda r: r["tokens_per_second"])[args.rounds // 2]
    matmul, attention = runs["ours"][0]["precisions"].split(",")
    print(
        f"{'ceiling: the kernels alone':<30} {bound['tokens_per_second']:>8,.0f} tokens/s: matrix products "
        f"({matmul}) {bound['matmul_seconds']:.2f} s per batch at {bound['matmul_gflops']:,.0f} GFLOP/s + attention "
        f"({attention}) {bound['attention_seconds']:.2f} s; ours at {medians['ours'] / bound['tokens_per_second']:.0%}"
        f" of it; at most {bound['tokens_per_second'] / medians['hf']:.2f}x transformers with these kernels"
    )
    print(
        f"speed-up (median over median): {medians['ours'] / medians['hf']:.2f}x"
        + (f"; with document mask {medians['ours-doc'] / medians['hf']:.2f}x" if args.document_mask else "")
    )
    load = (load_before, os.getloadavg()[0])
    busy = "contended: other processes shared the cores" if max(load) > (os.cpu_count() or 1) else "quiet"
    print(f"load average {load[0]:.1f} before, {load[1]:.1f} after, {os.cpu_count()} cores: {busy}")


def cpu_info() -> dict[str, str]:
    """/proc/cpuinfo's fields ("model name", "flags", ...); empty where there is none (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


def cpu_description() -> str:
    """The CPU model and the flags that decide fast fp32/bf16 paths (Linux /proc/cpuinfo; else platform)."""
    info = cpu_info()
    if not info:
        return platform.processor() or "unknown"
    flags = set(info.get("flags", "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    native_bf16 = "native bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no native bf16"
    # "AMD EPYC" alone names a Zen 3, 4 or 5 alike; family and model tell them apart (AMD 25: Zen 3/4, 26: Zen 5)
    family = f"family {info['cpu family']} model {info['model']}, " if "cpu family" in info and "model" in info else ""
    return f"{info.get('model name', 'unknown')} ({family}{', '.join(shown) or 'no AVX2'}; {native_bf16})"


if __name__ == "__main__":
    main()
