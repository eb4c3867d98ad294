"""Losses that can be compared across runs and tokenizers, and the sample story: the `Evaluator`.

One `Evaluator` owns a fixed set of validation windows and everything computed from them, so training, the
`eval` verb and the story judge report the same figures the same way:

    evaluator = Evaluator(windows, tokenizer, batch_size=16, max_batches=None, device="cpu")
    # or, from a data source: Evaluator.from_data("stories.txt", tokenizer, context_length=512)
    result = evaluator.evaluate(model)         # EvalResult: loss, bits_per_byte, nats_per_gpt2_token, ...
    story = evaluator.sample(model, 200, seed=0)  # SAMPLE_PROMPT and the model's continuation, as text
    report = evaluator.judge(model, samples=2)  # story metrics on the TinyStories authors' prompts (judge.py)

`evaluate()` scores all windows in order, or with `max_batches` that many batches' worth of windows spread
evenly over the data (the first batches alone would be a biased sample: stories in a file are not shuffled, and
on `validation-first1000.txt` windows 320-640 score ~0.2 bits/byte worse than the first 320), and fills
`EvalResult.gpt2_tokens`, the GPT-2 token count of the scored text, counted once per evaluator (its windows
never change). With `stride`, each window is scored `stride` targets at a time after the tokens before them
(sliding-window evaluation): the same text, each token read with more of what precedes it. `sample()` draws
from its own seeded generator, so it never moves the caller's RNG stream.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TokenWindows, prepare
from .errors import UserError
from .generate import Sampling, generate
from .tokenizer import Tokenizer

SAMPLE_PROMPT = "One day, a little girl named Lily found a needle in her room."
STORY_SAMPLING = Sampling(0.8, top_k=50)  # the sample story of each evaluation during training


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

    def to_record(self) -> dict:
        """The validation figures of an `eval` record in metrics.jsonl (what `compare` reads back)."""
        return {
            "val_loss": self.loss,
            "val_bpb": self.bits_per_byte,
            "val_nats_per_gpt2_token": self.nats_per_gpt2_token,
        }


class Evaluator:
    """Validation loss, bits per byte, GPT-2-token-equivalent loss and a sample story over fixed windows."""

    def __init__(
        self,
        windows: TokenWindows,
        tokenizer: Tokenizer,
        batch_size: int = 16,
        max_batches: int | None = None,
        device: torch.device | str = "cpu",
        autocast: contextlib.AbstractContextManager | None = None,
        stride: int | None = None,
    ) -> None:
        check_stride(stride, windows.context_length)  # here too: a bad stride fails before any scoring
        self.windows, self.tokenizer, self.stride = windows, tokenizer, stride
        self.batch_size, self.max_batches = batch_size, max_batches
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext()  # e.g. the run's bf16 autocast
        self.token_bytes = torch.tensor(tokenizer.token_bytes(), device=self.device)
        self._gpt2_tokens: int | None = None

    @property
    def windows_scored(self) -> int:
        return len(self._scored())

    def _scored(self) -> np.ndarray:
        return scored_windows(len(self.windows), self.batch_size, self.max_batches)

    @classmethod
    def from_data(
        cls,
        data: str | os.PathLike,
        tokenizer: Tokenizer,
        context_length: int,
        split: str = "validation",
        progress: bool = False,
        **options,
    ) -> Evaluator:
        """An evaluator over all of `data` (prepared, and cached, with `tokenizer`); options as for __init__."""
        prepared = prepare(data, tokenizer, split=split, progress=progress)
        prepared.check_tokenizer(tokenizer)  # data prepared with another tokenizer would be scored as garbage
        windows = TokenWindows(prepared.tokens(), context_length, seed=None, name=f"evaluation data {data}")
        return cls(windows, tokenizer, **options)

    def evaluate(self, model: torch.nn.Module, progress: bool = False) -> EvalResult:
        """The model's loss over the evaluator's windows, with the GPT-2 token count of the scored text."""
        result = evaluate(model, self.windows, self.token_bytes, self.batch_size, self.max_batches, self.autocast,
                          progress, self.stride)  # fmt: skip
        if self._gpt2_tokens is None:  # the same windows every time: count their text's GPT-2 tokens once
            self._gpt2_tokens = gpt2_tokens_scored(self.windows, self._scored(), self.tokenizer)
        result.gpt2_tokens = self._gpt2_tokens
        return result

    def sample(
        self,
        model: torch.nn.Module,
        max_new_tokens: int,
        seed: int,
        prompt: str = SAMPLE_PROMPT,
        sampling: Sampling = STORY_SAMPLING,
    ) -> str:
        """`prompt` and the model's continuation of it, as a new story (the prompt follows an EOS, as stories do
        in the data), sampled from a generator of its own so that the caller's RNG stream is left alone."""
        tokens = [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]
        generator = torch.Generator(self.device).manual_seed(seed)
        with self.autocast:
            (story,) = generate(model, [tokens], max_new_tokens, sampling, self.tokenizer.eos_id, generator)
        return self.tokenizer.decode(tokens[1:] + story)

    def judge(self, model: torch.nn.Module, prompts: str | None = None, index=None, **options) -> dict:
        """Story metrics (and, with `judge=`, LLM grades) of `model`'s completions of `prompts` (default: the
        TinyStories authors' 44); `options` are `JudgeConfig` fields. The content of the judge's report.json."""
        from .generate import Storyteller
        from .judge import JudgeConfig, judge_stories
        from .prompts import load_prompts

        config = JudgeConfig(prompts=prompts, progress=False, **options)
        texts, name = load_prompts(prompts)
        with self.autocast:
            return judge_stories(Storyteller(model, self.tokenizer), texts, name, config, index)


def check_stride(stride: int | None, length: int) -> None:
    """Sliding windows tile a window's targets only with a stride that divides its length."""
    if stride is not None and (stride < 1 or length % stride):
        example = f" (e.g. {length // 2})" if length % 2 == 0 else ""
        raise UserError(f"stride {stride} must divide the context length {length}{example}")


def scored_windows(total: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    """Which of `total` windows evaluate() scores: all, in order, or `max_batches * batch_size` of them spread
    evenly over the data (window i * total // count for i < count)."""
    count = total if max_batches is None else min(total, max_batches * batch_size)
    return np.arange(count) * total // count


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: TokenWindows,
    token_bytes: torch.Tensor,
    batch_size: int,
    max_batches: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    progress: bool = False,
    stride: int | None = None,
) -> EvalResult:
    """Loss over `max_batches` batches of `windows` spread evenly over them (all of them with None, in order).

    With a `stride` smaller than the context length, each window is scored `stride` targets at a time, each
    piece read after the tokens before it (sliding-window evaluation, TokenWindows.pieces): the same targets,
    with more context for those near a window's start, at context / stride times the cost."""
    was_training = model.training
    model.eval()
    device = token_bytes.device
    length = windows.context_length
    check_stride(stride, length)
    indices = scored_windows(len(windows), batch_size, max_batches)
    rows = [piece for index in indices for piece in windows.pieces(int(index), stride or length)]
    positions = torch.arange(length, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    text_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batches = range(0, len(rows), batch_size)
    for first in tqdm(batches, desc="eval", unit="batch", disable=None if progress else True):
        batch = rows[first : first + batch_size]
        inputs, targets = windows.tensors([tokens for tokens, _ in batch], device)
        scored = [count for _, count in batch]
        mask = None if min(scored) == length else positions >= length - torch.tensor(scored, device=device)[:, None]
        with autocast or contextlib.nullcontext():
            nats += model.loss(inputs, targets, reduction="sum", mask=mask).double()
        text_bytes += token_bytes[targets if mask is None else targets[mask]].sum()
    model.train(was_training)
    tokens = sum(count for _, count in rows)
    return EvalResult(nats=nats.item(), tokens=tokens, text_bytes=int(text_bytes.item()))


def gpt2_tokens_scored(windows: TokenWindows, indices: np.ndarray, tokenizer: Tokenizer) -> int:
    """GPT-2 tokens of the text evaluate() scored: the targets of windows `indices`, each run of consecutive
    windows read as the one stretch of text it is."""
    gpt2 = Tokenizer.gpt2()
    runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)
    return sum(
        gpt2_token_count(tokenizer, np.concatenate([windows.window(int(i))[1:] for i in run]), gpt2) for run in runs
    )


def gpt2_token_count(tokenizer: Tokenizer, tokens: np.ndarray, gpt2: Tokenizer) -> int:
    """How many GPT-2 tokens the text of `tokens` takes: each story re-encoded, plus one per EOS."""
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    stories = np.split(tokens, ends + 1)  # each piece ends with its EOS (the last may be cut off)
    texts = [tokenizer.decode(piece[piece != tokenizer.eos_id].tolist()) for piece in stories]
    return sum(map(len, gpt2.encode_batch(texts))) + len(ends)
