"""Where a GPU training step loses MFU: the `28M` model (4096-token vocabulary, context 512) in a plain compiled loop
(bf16 autocast, fused AdamW, one process), then with each thing the trainer adds to a step, two rounds each.

    PYTHONPATH=src python benchmarks/gpu_step_costs.py PREPARED_DIR [BATCH]

PREPARED_DIR is a `gpt-tinystories prepare --out` folder (its windows are the "real windows" rows); BATCH
sequences of 512 tokens per step (default 128). MFU as in train_mfu.py (989.4 TFLOP/s dense bf16 peak).
"""

import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from gpu_attention_check import stories  # noqa: E402
from train_mfu import DATASHEET_BF16_TFLOPS, flops_per_token  # noqa: E402

from gpt_tinystories.config import ModelConfig  # noqa: E402
from gpt_tinystories.data import PreparedData, TokenWindows  # noqa: E402
from gpt_tinystories.model import GPT  # noqa: E402

batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
device = torch.device("cuda")
config = ModelConfig.from_preset("28M", 4096, context_length=512)
torch.manual_seed(0)
model = GPT(config).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
loss_fn = torch.compile(model.loss)
fixed = stories(batch, 513, 4096).to(device)
windows = TokenWindows(PreparedData.open(sys.argv[1]).tokens(), 512, seed=1337)


def run(label: str, steps: int, clip: bool, sync: bool, data: bool) -> None:
    for step in range(steps + 5):
        if step == 5:
            torch.cuda.synchronize()
            started = time.perf_counter()
        if data:
            inputs, targets = windows.batch(step * batch, batch, device)
        else:
            inputs, targets = fixed[:, :-1], fixed[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(inputs, targets)
        loss.backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if sync:
            bad = not (torch.isfinite(loss).item() and torch.isfinite(norm).item())
            assert not bad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    rate = steps * batch * 512 / (time.perf_counter() - started)
    mfu = rate * flops_per_token(config) / (DATASHEET_BF16_TFLOPS["H100"] * 1e12)
    print(f"  {label:<40} {rate:>12,.0f} tokens/s  MFU {mfu:6.1%}", flush=True)


print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, 28M batch {batch}x512 compiled loss, bf16")
run("warm-up (compiles)", 3, False, False, False)
for _ in range(2):
    run("plain loop", 30, False, False, False)
    run("+ grad clipping", 30, True, False, False)
    run("+ clipping + host read of loss/norm", 30, True, True, False)
    run("+ clipping + host read + real windows", 30, True, True, True)
