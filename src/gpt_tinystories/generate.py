"""Decoding on top of the model's KV cache: sampling (temperature, top-k, top-p), greedy, beam search, and
streaming text that never splits a UTF-8 character.

Prompts are prefilled once; each new token is then one forward pass over one position per row. Prompts of
different lengths are left-padded and masked, so a batch decodes together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .model import GPT, KVCache
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. temperature 0 is greedy; top_k / top_p keep the likeliest tokens."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of `logits` (batch, vocab)."""
        if self.temperature == 0 or self.top_k == 1:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token once the ones before it already cover top_p (the first token always stays)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of each prompt's row (None once a row has produced `eos_id`).

    Prompts must be non-empty; one longer than the context keeps its last tokens. Past the context length
    the cache is rebuilt from the most recent half-context of each row.
    """
    was_training = model.training
    model.eval()
    context = model.config.context_length
    rows = [list(p)[-context:] for p in prompts]
    finished = torch.zeros(len(rows), dtype=torch.bool, device=model.wte.weight.device)
    cache, logits = _prefill(model, rows, min(context, max(map(len, rows)) + max_new_tokens))
    try:
        for _ in range(max_new_tokens):
            tokens = sampling.pick(logits, generator)
            new = [None if done else token for done, token in zip(finished.tolist(), tokens.tolist(), strict=True)]
            for row, token in zip(rows, new, strict=True):
                if token is not None:
                    row.append(token)
            yield new
            if eos_id is not None:
                finished |= tokens == eos_id
                if bool(finished.all()):
                    return
            if cache.length == cache.capacity:  # out of context: slide the window and prefill again
                cache, logits = _prefill(model, [r[-(context // 2) :] for r in rows], context)
            else:
                logits = model(tokens[:, None], cache)[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt, ending with `eos_id` where it was produced."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for new in decode(model, prompts, max_new_tokens, sampling, eos_id, generator):
        for output, token in zip(outputs, new, strict=True):
            if token is not None:
                output.append(token)
    return outputs


def _prefill(model: GPT, rows: list[list[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
    """A cache holding `rows` (left-padded to the longest), and the logits after each row's last token."""
    device = model.wte.weight.device
    longest = max(map(len, rows))
    pad = torch.tensor([longest - len(r) for r in rows], device=device)
    idx = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)
    cache = model.new_cache(len(rows), capacity, pad)
    return cache, model(idx, cache)[:, -1]


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    num_beams: int = 5,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
) -> list[int]:
    """The most likely continuation found by beam search (what the TinyStories authors used, with 5 beams).

    Hypotheses that end with EOS are scored by total log-probability / length ** length_penalty; the search
    stops once `num_beams` of them are finished or `max_new_tokens` is reached.
    """
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    prompt = list(prompt)[-model.config.context_length :]
    capacity = min(model.config.context_length, len(prompt) + max_new_tokens)
    cache = model.new_cache(num_beams, capacity)
    logits = model(torch.tensor([prompt] * num_beams, device=device), cache)[:, -1]
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    done: list[tuple[float, list[int]]] = []
    for _ in range(min(max_new_tokens, capacity - len(prompt))):
        candidates = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).flatten()
        top_scores, top_ids = candidates.topk(2 * num_beams)
        vocab = logits.shape[-1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top_ids.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == eos_id:
                sequence = beams[row] + [token]
                done.append((score / len(sequence) ** length_penalty, sequence))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == num_beams:
                break
        if len(done) >= num_beams:
            break
        beams = [beams[r] + [t] for r, t in zip(keep_rows, keep_tokens, strict=True)]
        scores = torch.tensor(keep_scores, device=device)
        cache.reorder(torch.tensor(keep_rows, device=device))
        if cache.length == cache.capacity:
            break
        logits = model(torch.tensor(keep_tokens, device=device)[:, None], cache)[:, -1]
    live = [(s / max(len(b), 1) ** length_penalty, b) for s, b in zip(scores.tolist(), beams, strict=True)]
    model.train(was_training)
    return max(done or live, key=lambda pair: pair[0])[1]


class TextStream:
    """Turns tokens into text as they come, holding back a token that ends inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already handed out

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the bytes that complete it
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted :], len(text)
        return new


class Storyteller:
    """A model and its tokenizer, for text in and text out: what `gpt_tinystories.load()` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, source: str = "") -> None:
        self.model, self.tokenizer, self.source = model, tokenizer, source

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens, starting a new story after EOS (an empty prompt starts one from scratch)."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Pieces of the continuation as they are generated (it stops at EOS, which is not included)."""
        stream = TextStream(self.tokenizer)
        for (token,) in decode(
            self.model,
            [self.encode_prompt(prompt)],
            max_new_tokens,
            Sampling(temperature, top_k, top_p),
            self.tokenizer.eos_id,
            self._generator(seed),
        ):
            if token is not None and token != self.tokenizer.eos_id and (piece := stream.push(token)):
                yield piece
        if tail := stream.flush():
            yield tail

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
    ) -> str | list[str]:
        """The prompt's continuation (a list of `num_samples` of them when more than one)."""
        prompts = [self.encode_prompt(prompt)] * num_samples
        sampling = Sampling(temperature, top_k, top_p)
        outputs = generate(self.model, prompts, max_new_tokens, sampling, self.tokenizer.eos_id, self._generator(seed))
        texts = [self.tokenizer.decode([t for t in out if t != self.tokenizer.eos_id]) for out in outputs]
        return texts[0] if num_samples == 1 else texts

    def beam_search(self, prompt: str = "", max_new_tokens: int = 200, num_beams: int = 5) -> str:
        tokens = beam_search(self.model, self.encode_prompt(prompt), max_new_tokens, num_beams, self.tokenizer.eos_id)
        return self.tokenizer.decode([t for t in tokens if t != self.tokenizer.eos_id])

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(self.model.wte.weight.device).manual_seed(seed)
