"""Shared by the playground's tests: a tiny random model saved as a checkpoint (random weights write
reproducible nonsense, which is all these tests need), and a wait for the server to be idle."""

import time
from pathlib import Path

import httpx
import torch

from gpt_tinystories import checkpoint
from gpt_tinystories.config import ModelConfig
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import TOKENIZER_FILE, Tokenizer

STEP = 7  # recorded in the checkpoint, reported by /api/model


def save_tiny_checkpoint(directory: Path, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layer=2, n_head=4, context_length=64)
    meta = {"step": STEP, "tokens": STEP * 512, "val_loss": None, "model_config": config.to_dict(),
            "train_config": {"preset": "1M"},
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "file": TOKENIZER_FILE}}  # fmt: skip
    return checkpoint.save(
        directory, GPT(config).state_dict(), meta, None, {TOKENIZER_FILE: tokenizer.backend.to_str()}
    )


def wait_until_idle(url: str, timeout: float = 20.0) -> dict:
    """The server's /health once its worker has nothing running or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(url + "health").json()
        if not health["busy"] and not health["queued"]:
            return health
        time.sleep(0.02)
    raise AssertionError(f"the worker is still busy after {timeout} s: {health}")
