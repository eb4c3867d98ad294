"""Decoding: sample a continuation from the model."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New tokens after `prompt`, stopping after `eos_id`. Temperature 0 is greedy.

    A private `generator` keeps sampling from consuming the global RNG (training stays reproducible).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = model.config.context_length
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context:])[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        new.append(token)
        if token == eos_id:
            break
        idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)
    model.train(was_training)
    return new
