"""gpt-tinystories: train, evaluate and sample small GPT models on TinyStories.

from gpt_tinystories import TrainConfig, train
result = train(TrainConfig(preset="1M", data="TinyStories-train.txt", max_time="15m"), "runs/1m")
"""

from .config import PRESETS, ModelConfig, TrainConfig
from .errors import UserError
from .tokenizer import Tokenizer

__all__ = ["GPT", "PRESETS", "ModelConfig", "Tokenizer", "TrainConfig", "UserError", "load", "train"]
__version__ = "0.1.0"


def load(path: str, device: str = "auto", dtype: str = "fp32"):
    """A trained model (a run dir or checkpoint folder) as a `Storyteller`: .generate(), .stream(), .beam_search().

    dtype "bf16" halves the weights' memory traffic: decoding the 8M preset at batch 1 is 1.7x faster on a
    2-core AVX-512 CPU (the 1M preset is slower: it is bound by per-operation overhead, not memory)."""
    from .checkpoint import load_model
    from .generate import Storyteller
    from .quantize import apply_dtype
    from .runtime import pick_device

    model, tokenizer, meta = load_model(path, pick_device(device))
    return Storyteller(apply_dtype(model, dtype), tokenizer, meta["path"])


def __getattr__(name: str):  # torch-heavy names load on first use, so `gpt-tinystories presets` starts fast
    if name == "train":
        from .trainer import train

        return train
    if name == "GPT":
        from .model import GPT

        return GPT
    raise AttributeError(f"module 'gpt_tinystories' has no attribute {name!r}")
