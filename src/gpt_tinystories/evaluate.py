"""Losses that can be compared across runs and tokenizers."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TokenWindows
from .tokenizer import Tokenizer


@dataclass
class EvalResult:
    nats: float  # summed cross-entropy over all predicted tokens
    tokens: int
    text_bytes: int  # UTF-8 bytes those tokens stand for (EOS counts none)
    gpt2_tokens: int | None = None  # GPT-2 tokens of the same text (EOS counted once), when asked for

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

    @property
    def nats_per_gpt2_token(self) -> float | None:
        """Total nats / GPT-2 tokens of the same text: comparable with models that use GPT-2's tokenizer."""
        return self.nats / self.gpt2_tokens if self.gpt2_tokens else None

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "text_bytes": self.text_bytes, "gpt2_tokens": self.gpt2_tokens,
                "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "nats_per_gpt2_token": self.nats_per_gpt2_token}  # fmt: skip


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: TokenWindows,
    token_bytes: torch.Tensor,
    batch_size: int,
    max_batches: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    progress: bool = False,
) -> EvalResult:
    """Loss over the first `max_batches` batches of `windows` (all of them with None), in order."""
    was_training = model.training
    model.eval()
    device = token_bytes.device
    count = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    text_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for first in tqdm(range(0, count, batch_size), desc="eval", unit="batch", disable=None if progress else True):
        inputs, targets = windows.batch(first, min(batch_size, count - first), device)
        with autocast or contextlib.nullcontext():
            nats += model.loss(inputs, targets, reduction="sum").double()
        text_bytes += token_bytes[targets].sum()
    model.train(was_training)
    return EvalResult(nats=nats.item(), tokens=count * windows.context_length, text_bytes=int(text_bytes.item()))


def gpt2_tokens_scored(result: EvalResult, windows: TokenWindows, tokenizer: Tokenizer) -> int:
    """GPT-2 tokens of the text that `result` scored: the targets of the first windows, in order."""
    count = result.tokens // windows.context_length
    targets = np.concatenate([windows.window(i)[1:] for i in range(count)])
    return gpt2_token_count(tokenizer, targets, Tokenizer.gpt2())


def gpt2_token_count(tokenizer: Tokenizer, tokens: np.ndarray, gpt2: Tokenizer) -> int:
    """How many GPT-2 tokens the text of `tokens` takes: each story re-encoded, plus one per EOS."""
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    stories = np.split(tokens, ends + 1)  # each piece ends with its EOS (the last may be cut off)
    texts = [tokenizer.decode(piece[piece != tokenizer.eos_id].tolist()) for piece in stories]
    return sum(map(len, gpt2.encode_batch(texts))) + len(ends)
