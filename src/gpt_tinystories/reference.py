"""A reference model's score of a completion: nats per GPT-2-token equivalent of the continuation, given the prompt.

The reference (one of our checkpoints, or a transformers GPT-2 / GPT-Neo model such as
roneneldan/TinyStories-33M) reads the prompt, then the continuation; the score is the continuation's summed
negative log-likelihood (its EOS included when the story finished) divided by the GPT-2 token count of the
same text (+1 for that EOS), so references with different tokenizers give comparable figures. Lower means
text the reference finds more predictable: fluent, but also bland or copied, which is why it is read beside
distinct-n and the copying metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .story_metrics import Completion
from .tokenizer import Tokenizer


class Reference:
    def __init__(self, source: str, device: str = "auto") -> None:
        from .checkpoint import load_model
        from .runtime import pick_device

        self.model, self.tokenizer, meta = load_model(source, pick_device(device))
        self.source = meta.get("path", source)
        self.gpt2 = Tokenizer.gpt2()

    @torch.inference_mode()
    def scores(self, completions: Sequence[Completion], batch_size: int = 16) -> list[float | None]:
        """Nats per GPT-2 token of each completion's continuation (None for an empty one)."""
        rows, spans, lengths, gpt2_tokens = [], [], [], []
        context = self.model.config.context_length
        eos = self.tokenizer.eos_id
        for c in completions:
            prompt = [eos, *self.tokenizer.encode(c.prompt)]
            continuation = self.tokenizer.encode(c.text) + ([eos] if c.finished else [])
            sequence = (prompt + continuation)[-(context + 1) :]  # a long story keeps its end (and a short prefix)
            rows.append(sequence)
            spans.append(min(len(continuation), len(sequence) - 1))
            lengths.append(len(continuation))
            gpt2_tokens.append(len(self.gpt2.encode(c.text)) + (1 if c.finished else 0))
        nats = []
        for start in range(0, len(rows), batch_size):
            nats += self._nats(rows[start : start + batch_size], spans[start : start + batch_size])
        # A continuation longer than the reference's context is scored on its last tokens: their mean, scaled
        # to the whole continuation's length, stands for it.
        return [n / s * length / g if g and s else None
                for n, s, length, g in zip(nats, spans, lengths, gpt2_tokens, strict=True)]  # fmt: skip

    def _nats(self, rows: list[list[int]], spans: list[int]) -> list[float]:
        """Summed NLL of the last `span` tokens of each row; rows are right-padded (causal: padding after a
        token never changes its prediction)."""
        device = self.model.wte.weight.device
        longest = max(map(len, rows))
        idx = torch.tensor([r + [0] * (longest - len(r)) for r in rows], device=device)
        logprobs = torch.log_softmax(self.model(idx[:, :-1]).float(), dim=-1)
        picked = logprobs.gather(-1, idx[:, 1:, None]).squeeze(-1)  # log p(token t | tokens before t)
        out = []
        for row, (tokens, span) in enumerate(zip(rows, spans, strict=True)):
            end = len(tokens) - 1
            out.append(-float(picked[row, end - span : end].sum()) if span else 0.0)
        return out
