"""Decoding on top of the model's KV cache: sampling (temperature, top-k, top-p), greedy, beam search, and
streaming text that never splits a UTF-8 character.

Sampling and greedy decoding run on the decode engine (engine.py: KV-cache slots, a static-shape decode step
that can be compiled, per-row sampling settings and generators); beam search keeps its own cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .config import check_seed
from .engine import Engine, Sampling
from .errors import UserError
from .model import GPT
from .tokenizer import EOS, Tokenizer

__all__ = ["Sampling", "Storyteller", "TextStream", "beam_search", "check_seed", "decode", "generate"]

RANDOM = Sampling()  # plain sampling at temperature 1


@torch.inference_mode()
def decode(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = RANDOM,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of each prompt's row (None once a row has produced `eos_id`).

    One engine step per token: the rows decode together in the engine's slots. `generator` is shared by all
    rows (they draw from it in row order), or one per row. Prompts must be non-empty; one longer than the
    context keeps its last tokens. Past the context length a row's cache is rebuilt from its most recent
    half-context. `compile` compiles the decode step (worth it only for long or repeated decoding: see engine.py).
    """
    _check_positive(max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    prompts = [list(p)[-model.config.context_length :] for p in prompts]
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * len(prompts)
    capacity = min(model.config.context_length, max(map(len, prompts)) + max_new_tokens)
    engine = Engine(model, len(prompts), capacity, compile, prefill_chunk=sum(map(len, prompts)))
    rows = {engine.add(prompt, max_new_tokens, sampling, eos_id, row_generator).id: row
            for row, (prompt, row_generator) in enumerate(zip(prompts, generators, strict=True))}  # fmt: skip
    try:
        while engine.busy:
            new: list[int | None] = [None] * len(prompts)
            for sequence, token in engine.step():
                new[rows[sequence.id]] = token
            yield new
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = RANDOM,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt, ending with `eos_id` where it was produced."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for new in decode(model, prompts, max_new_tokens, sampling, eos_id, generator, compile):
        for output, token in zip(outputs, new, strict=True):
            if token is not None:
                output.append(token)
    return outputs


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
    _check_positive(max_new_tokens=max_new_tokens, num_beams=num_beams)
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


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

    def __init__(self, model: GPT, tokenizer: Tokenizer, source: str = "", compile: bool = False) -> None:
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.compile = compile  # compile the decode step (see engine.py; pays for long or repeated decoding)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens, starting a new story after EOS (an empty prompt starts one from scratch)."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 1000,  # a cap, not a length: a story stops at its end (EOS)
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        keep_eos: bool = False,
    ) -> Iterator[str]:
        """Pieces of the continuation as they are generated. It stops at EOS, which comes last as a piece of its
        own (tokenizer.EOS) with `keep_eos`, so that a caller can tell a story that ended from one that was cut."""
        stream = TextStream(self.tokenizer)
        ended = False
        for (token,) in decode(
            self.model,
            [self.encode_prompt(prompt)],
            max_new_tokens,
            Sampling(temperature, top_k, top_p),
            self.tokenizer.eos_id,
            self.generator(seed),
            self.compile,
        ):
            ended = ended or token == self.tokenizer.eos_id
            if token is not None and token != self.tokenizer.eos_id and (piece := stream.push(token)):
                yield piece
        if tail := stream.flush():
            yield tail
        if ended and keep_eos:
            yield EOS

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 1000,  # a cap, not a length: a story stops at its end (EOS)
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        keep_eos: bool = False,
    ) -> str | list[str]:
        """The prompt's continuation (a list of `num_samples` of them when more than one); with `keep_eos`, one that
        ended by itself ends with tokenizer.EOS.

        Sample i draws from its own generator seeded with seed + i: the same text as a call with that seed alone."""
        _check_positive(num_samples=num_samples)
        prompts = [self.encode_prompt(prompt)] * num_samples
        sampling = Sampling(temperature, top_k, top_p)
        generators = [self.generator(None if seed is None else seed + i) for i in range(num_samples)]
        eos = self.tokenizer.eos_id
        outputs = generate(self.model, prompts, max_new_tokens, sampling, eos, generators, self.compile)
        texts = [self._text(out, keep_eos) for out in outputs]
        return texts[0] if num_samples == 1 else texts

    def beam_search(self, prompt: str = "", max_new_tokens: int = 200, num_beams: int = 5,
                    keep_eos: bool = False) -> str:  # fmt: skip
        tokens = beam_search(self.model, self.encode_prompt(prompt), max_new_tokens, num_beams, self.tokenizer.eos_id)
        return self._text(tokens, keep_eos)

    def _text(self, tokens: Sequence[int], keep_eos: bool) -> str:
        """New tokens as text: they end with EOS where the story ended, which is kept as text only if asked."""
        ended = bool(tokens) and tokens[-1] == self.tokenizer.eos_id
        text = self.tokenizer.decode([t for t in tokens if t != self.tokenizer.eos_id])
        return text + EOS if ended and keep_eos else text

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A generator on the model's device seeded with `seed` (None: the global one)."""
        check_seed(seed)
        return None if seed is None else torch.Generator(self.model.wte.weight.device).manual_seed(seed)
