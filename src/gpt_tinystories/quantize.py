"""int8 weights for CPU inference (`--dtype int8`): every Linear layer of the blocks becomes PyTorch's dynamic
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

import warnings

import torch

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


DTYPES = ("fp32", "bf16", "int8")


def apply_dtype(model: GPT, dtype: str) -> GPT:
    """`model` for inference in fp32, bf16 (weights cast) or int8 (see quantize_int8)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8":
        return quantize_int8(model)
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def weights_dtype(model: GPT) -> str:
    """int8 for a model from quantize_int8 (its embedding stays fp32), else its weights' dtype."""
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()):
        return "int8"
    return str(model.wte.weight.dtype).removeprefix("torch.")


def quantize_int8(model: GPT) -> GPT:
    """A copy of `model` (on the CPU) whose blocks' Linear layers are int8, for inference."""
    check_int8(model.wte.weight.device)
    spec = {"blocks": torch.ao.quantization.per_channel_dynamic_qconfig}  # not an untied lm_head: see above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation notices are for us (see above), not for users
        return torch.ao.quantization.quantize_dynamic(model.float().eval(), spec, inplace=False)
