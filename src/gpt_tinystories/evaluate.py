"""Losses that can be compared across runs and tokenizers."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .data import TokenWindows


@dataclass
class EvalResult:
    nats: float  # summed cross-entropy over all predicted tokens
    tokens: int
    text_bytes: int  # UTF-8 bytes those tokens stand for (EOS counts none)

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Tokenizer-independent: total nats / ln 2 / bytes of text."""
        return self.nats / math.log(2) / self.text_bytes


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: TokenWindows,
    token_bytes: torch.Tensor,
    batch_size: int,
    max_batches: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> EvalResult:
    """Loss over the first `max_batches` batches of `windows` (all of them with None), in order."""
    was_training = model.training
    model.eval()
    device = token_bytes.device
    count = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    text_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for first in range(0, count, batch_size):
        inputs, targets = (t.to(device) for t in windows.batch(first, min(batch_size, count - first)))
        with autocast or contextlib.nullcontext():
            nats += model.loss(inputs, targets, reduction="sum").double()
        text_bytes += token_bytes[targets].sum()
    model.train(was_training)
    return EvalResult(nats=nats.item(), tokens=count * windows.context_length, text_bytes=int(text_bytes.item()))
