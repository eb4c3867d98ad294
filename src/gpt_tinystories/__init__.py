"""gpt-tinystories: train, evaluate and sample small GPT models on TinyStories.

from gpt_tinystories import TrainConfig, train
result = train(TrainConfig(preset="1M", data="TinyStories-train.txt", max_time="15m"), "runs/1m")
"""

from .config import PRESETS, ModelConfig, TrainConfig
from .errors import UserError
from .tokenizer import Tokenizer

__all__ = ["GPT", "PRESETS", "ModelConfig", "Tokenizer", "TrainConfig", "UserError", "load", "train"]
__version__ = "0.1.0"


def load(path: str, device: str = "auto"):
    """A trained model (a run dir or checkpoint folder) as a `Storyteller`: .generate(), .stream(), .beam_search()."""
    from .checkpoint import load_model
    from .generate import Storyteller
    from .runtime import pick_device

    model, tokenizer, meta = load_model(path, pick_device(device))
    return Storyteller(model, tokenizer, meta["path"])


def __getattr__(name: str):  # torch-heavy names load on first use, so `gpt-tinystories presets` starts fast
    if name == "train":
        from .train import train

        return train
    if name == "GPT":
        from .model import GPT

        return GPT
    raise AttributeError(f"module 'gpt_tinystories' has no attribute {name!r}")
