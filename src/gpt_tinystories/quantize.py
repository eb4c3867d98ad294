"""Smaller weights for CPU inference: fp16 (`--dtype fp16`) and int8 (`--dtype int8`).

fp16: every Linear layer of the blocks, and the LM head, keep their weights in fp16 (half the bytes). Decoding
one sequence is bound by reading the weights once per token, and PyTorch's CPU fp16 matrix-vector kernel reads
half the bytes of fp32's: measured on a 2-core AMD Zen 4, the 8M preset's 33 matrix-vector products took 0.63 ms
in fp16 against 3.19 ms in fp32 (bf16: 1.60). Several rows at once (a batch, a prompt, evaluation) run in fp32
from the fp16 weights: a CPU without native fp16 runs fp16 matrix products 4-6x slower than fp32 (same machine).
Everything else (embeddings, norms, attention, the KV cache) stays fp32.

int8: every Linear layer of the blocks becomes PyTorch's dynamic
int8 Linear (weights int8 with one scale per output row; activations quantized on the fly; fbgemm / oneDNN
VNNI kernels on x86, QNNPACK on ARM). The token embedding, and with it the tied LM head, stays fp32: it is
read one row per token on the way in, and the head's logits are what sampling and the loss see.

Why these kernels and not torchao: measured on a 2-core Xeon (Cascade Lake, AVX-512 VNNI), contended,
greedy decoding of the 8M preset: torchao's Int8WeightOnlyConfig ran at 0.25-0.63x of fp32 and its
Int8DynamicActivationInt8WeightConfig at 0.18-0.28x (tensor-subclass dispatch per call, no fused CPU kernel
without torch.compile), torch's own `_weight_int8pack_mm` at 0.06-0.29x, while the dynamic int8 Linear ran
at 0.8-1.0x with 4x smaller weights. PyTorch marks that eager-mode API deprecated in favour of torchao; should
it disappear, `--dtype int8` says so in one line rather than crash.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .model import GPT

ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


def check_int8(device: torch.device) -> None:
    """Refuse, in one line, a device or a PyTorch build without int8 kernels."""
    if device.type != "cpu":
        raise UserError(f"--dtype int8 runs on the CPU only (PyTorch's int8 kernels); on {device.type} use "
                        "--dtype bf16, or pass --device cpu")  # fmt: skip
    engines = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    if not engines or not hasattr(torch.ao.quantization, "quantize_dynamic"):
        raise UserError(f"this PyTorch build ({torch.__version__}) has no int8 CPU kernels; use --dtype fp32 or bf16")


DTYPES = ("fp32", "bf16", "fp16", "int8")


def apply_dtype(model: GPT, dtype: str) -> GPT:
    """`model` for inference in fp32, bf16 (weights cast), fp16 (see half_weights) or int8 (see quantize_int8)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8":
        return quantize_int8(model)
    if dtype == "fp16":
        return half_weights(model)
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def weights_dtype(model: GPT) -> str:
    """int8 or fp16 for a model from quantize_int8 or half_weights (their embeddings stay fp32), else its weights'
    dtype."""
    modules = list(model.modules())
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in modules):
        return "int8"
    if any(isinstance(m, HalfLinear) for m in modules):
        return "fp16"
    return str(model.wte.weight.dtype).removeprefix("torch.")


class HalfLinear(nn.Module):
    """A Linear layer with fp16 weights: one row in fp16, several in fp32 (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("half_weight", weight.detach().half())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # fp32, for what reads a head's weight (the loss)
        return self.half_weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() == 1:  # inputs come from a norm, attention or GELU: well inside fp16's range
            y = F.linear(x.half(), self.half_weight).to(x.dtype)
        else:
            y = F.linear(x, self.half_weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


def half_weights(model: GPT) -> GPT:
    """A copy of `model` (on the CPU) whose blocks' Linear layers and LM head keep fp16 weights, for inference."""
    if model.wte.weight.device.type != "cpu":
        raise UserError(f"--dtype fp16 is for decoding on a CPU; on {model.wte.weight.device.type} use --dtype "
                        "bf16, or pass --device cpu")  # fmt: skip
    half = copy.deepcopy(model).float().eval()
    for parent in half.blocks.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, HalfLinear(child.weight, child.bias))
    half.lm_head = HalfLinear(half.head_weight, None)  # tied or not: the head's own fp16 copy
    return half


def quantize_int8(model: GPT) -> GPT:
    """A copy of `model` (on the CPU) whose blocks' Linear layers are int8, for inference."""
    check_int8(model.wte.weight.device)
    spec = {"blocks": torch.ao.quantization.per_channel_dynamic_qconfig}  # not an untied lm_head: see above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation notices are for us (see above), not for users
        return torch.ao.quantization.quantize_dynamic(model.float().eval(), spec, inplace=False)
