"""gpt-tinystories: train, evaluate and sample small GPT models on TinyStories."""

from .config import PRESETS, ModelConfig
from .errors import UserError
from .tokenizer import Tokenizer

__all__ = ["PRESETS", "ModelConfig", "Tokenizer", "UserError"]
__version__ = "0.1.0"
