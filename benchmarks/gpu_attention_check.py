"""GPU check of the attention kernels (issue 14, point 4): exactness on CUDA, kernel timings, 28M MFU.

    PYTHONPATH=src python benchmarks/gpu_attention_check.py [--compile] [--steps 15] [--batch 32]

1. Exactness: a small model's logits and gradients with each kernel (sdpa, blocked, flex), with and without
   document masking, against plain causal SDPA (fp32); and a story's loss alone against the same story packed
   behind another one. Prints the largest differences; exits 1 if any exceeds its tolerance.
2. Kernel timings at the 28M preset's attention shape (16 heads of 32, context 512, bf16), forward + backward,
   causal and with stories of 100-300 tokens (synthetic EOS positions, TinyStories' typical length); causal SDPA
   with each of its CUDA backends forced (flash, memory-efficient, cuDNN).
3. MFU of the 28M preset (vocabulary 4096): bf16 autocast, fused AdamW, batch --batch x 512, on random tokens
   with the same synthetic stories: causal, document-masked with attention = auto (which measures and names its
   choice), and causal with cuDNN's attention forced; with --compile also torch.compile'd causal, with and without
   cuDNN (adds ~1-2 min of compilation). MFU as in train_mfu.py.
Takes < 1 minute on an H100 without --compile.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt_tinystories import attention
from gpt_tinystories.config import ModelConfig
from gpt_tinystories.model import GPT

EOS = 0


def stories(batch: int, time_: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (batch, time_), generator=generator)
    for row in idx:
        position = int(torch.randint(0, 200, (1,), generator=generator))
        while position < time_:
            row[position] = EOS
            position += int(torch.randint(100, 300, (1,), generator=generator))
    return idx


def check_exactness(device: torch.device) -> bool:
    ok = True
    idx = stories(4, 129, 50).to(device)
    small = {"vocab_size": 50, "d_model": 64, "n_layer": 2, "n_head": 4, "context_length": 128, "eos_id": EOS}

    def run(**overrides):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**{**small, **overrides})).to(device)
        logits = model(idx[:, :-1])
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        return logits, torch.cat([p.grad.flatten() for p in model.parameters()])

    for document_mask in (False, True):
        reference = run(attention="sdpa", document_mask=document_mask)
        for kernel in ("blocked", "flex"):
            try:
                logits, grads = run(attention=kernel, document_mask=document_mask)
            except Exception as error:  # report and go on: the other checks still tell something
                print(f"  {kernel:<8} document_mask={document_mask}: FAILED {type(error).__name__}: {error}")
                ok = False
                continue
            dl, dg = (logits - reference[0]).abs().max().item(), (grads - reference[1]).abs().max().item()
            good = dl < 1e-4 and dg < 1e-4
            ok &= good
            print(f"  {kernel:<8} document_mask={document_mask}: max |logits diff| {dl:.2e}, |grad diff| {dg:.2e} "
                  f"{'ok' if good else 'TOO LARGE'}")  # fmt: skip
    story = torch.tensor([[EOS, *range(11, 30)]], device=device)
    both = torch.cat([torch.arange(31, 45, device=device)[None], story], dim=1)
    for kernel in ("sdpa", "blocked", "flex"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**{**small, "attention": kernel, "document_mask": True, "position": "rope"})).to(device)
        try:
            alone = model.loss(story[:, :-1], story[:, 1:], reduction="sum")
            logits = model(both[:, :-1])[:, 14:]
        except Exception as error:
            print(f"  story loss alone vs packed ({kernel}): FAILED {type(error).__name__}: {error}")
            ok = False
            continue
        packed = F.cross_entropy(logits.flatten(0, 1), both[0, 15:], reduction="sum")
        diff = (alone - packed).abs().item()
        ok &= diff < 1e-3
        print(f"  story loss alone vs packed ({kernel}): {alone.item():.5f} vs {packed.item():.5f} "
              f"{'ok' if diff < 1e-3 else 'DIFFERENT'}")  # fmt: skip
    return ok


def time_kernels(device: torch.device) -> None:
    batch, heads, time_, head_size = 16, 16, 512, 32
    documents = attention.document_ids(stories(batch, time_, 4096).to(device), EOS)
    qkv = torch.randn(3, batch, heads, time_, head_size, device=device, dtype=torch.bfloat16)
    for label, docs, kernels in (
        ("causal", None, ("sdpa", "flex")),
        ("stories", documents, ("sdpa", "blocked", "flex")),
    ):
        for kernel in kernels:
            plan = attention.AttentionPlan(kernel, docs)
            q, k, v = (t.clone().requires_grad_() for t in qkv)
            try:
                for _ in range(3):  # warm-up, flex's compilation
                    plan(q, k, v, None).sum().backward()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(10):
                    plan(q, k, v, None).sum().backward()
                torch.cuda.synchronize()
                print(f"  {label:<8} {kernel:<8} {(time.perf_counter() - started) * 100:.2f} ms fwd+bwd")
            except Exception as error:
                print(f"  {label:<8} {kernel:<8} FAILED {type(error).__name__}: {error}")
    # Which of SDPA's CUDA backends is fastest at head size 32 (PyTorch picks flash first; cuDNN's may be faster).
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        q, k, v = (t.clone().requires_grad_() for t in qkv)
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                torch.cuda.synchronize()
            print(f"  causal   sdpa {backend.name.lower():<20} {(time.perf_counter() - started) * 100:.2f} ms fwd+bwd")
        except Exception as error:
            print(f"  causal   sdpa {backend.name.lower():<20} FAILED {type(error).__name__}: {str(error)[:100]}")
    # Training draws new stories every step: a new block mask (and mask function) must not recompile flex.
    try:
        started = time.perf_counter()
        for seed in range(1, 6):
            docs = attention.document_ids(stories(batch, time_, 4096, seed).to(device), EOS)
            q, k, v = (t.clone().requires_grad_() for t in qkv)
            attention.AttentionPlan("flex", docs)(q, k, v, None).sum().backward()
        torch.cuda.synchronize()
        print(f"  stories  flex, new stories each call: {(time.perf_counter() - started) * 200:.2f} ms fwd+bwd "
              "(with the block mask; far above the line above means recompilation)")  # fmt: skip
    except Exception as error:
        print(f"  stories  flex, new stories each call: FAILED {type(error).__name__}: {error}")


def mfu(device: torch.device, steps: int, batch: int, document_mask: bool, compile: bool, cudnn: bool = False) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_mfu import DATASHEET_BF16_TFLOPS, flops_per_token

    config = ModelConfig.from_preset("28M", 4096, context_length=512, document_mask=document_mask, eos_id=EOS)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    loss_fn = torch.compile(model.loss) if compile else model.loss
    idx = stories(batch, 513, 4096).to(device)
    for step in range(steps + 5):
        if step == 5:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), contextlib.ExitStack() as stack:
            if cudnn:
                stack.enter_context(sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
            loss = loss_fn(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tokens_per_second = steps * batch * 512 / (time.perf_counter() - started)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    achieved = tokens_per_second * flops_per_token(config) / 1e12
    shown = f"{100 * achieved / peak:.1f}% MFU" if peak else "MFU: unknown GPU peak"
    label = ("document mask, attention auto" if document_mask else "causal") + (", compiled" if compile else "")
    label += ", cuDNN attention" if cudnn else ""
    print(f"  28M {label}: {tokens_per_second:,.0f} tokens/s, {achieved:.1f} TFLOP/s, {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32, help="sequences of 512 tokens per training step")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd causal model")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_attention_check: no CUDA device here; run it on a GPU machine")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("1. exactness (fp32)")
    ok = check_exactness(device)
    print("2. attention kernels at the 28M shape (batch 16, 16 heads of 32, context 512, bf16)")
    time_kernels(device)
    print(f"3. 28M training, batch {args.batch}x512, bf16, {args.steps} timed steps")
    variants = [(False, False, False), (True, False, False), (False, False, True)]  # (documents, compile, cudnn)
    variants += [(False, True, False), (False, True, True)] if args.compile else []
    for document_mask, compile, cudnn in variants:
        try:
            mfu(device, args.steps, args.batch, document_mask, compile, cudnn)
        except Exception as error:  # report and go on: the other variants still tell something
            print(f"  28M document_mask={document_mask} compile={compile} cudnn={cudnn}: FAILED "
                  f"{type(error).__name__}: {str(error)[:100]}")  # fmt: skip
    print(f"  auto's choices: {attention._chosen}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
