"""A GPT-2 language model, small enough to read top to bottom.

Pre-LayerNorm transformer blocks, learned position embeddings, a GELU MLP of 4x the width, and an LM head
tied to the token embedding. Attention goes through PyTorch's fused scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # One matmul for q, k and v: fewer, larger kernels matter for tiny models.
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; keep it so exported weights behave identically.
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so shrink their output projections
        # by 1/sqrt(2 * n_layer) to keep the residual stream's variance independent of depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # the tied LM head is counted once
        return total - self.wte.weight.numel() - self.wpe.weight.numel() if non_embedding else total

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final (normalized) hidden state at every position of `idx` (batch, time)."""
        time = idx.shape[1]
        if time > self.config.context_length:
            raise ValueError(f"sequence of {time} tokens exceeds context_length={self.config.context_length}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, time, vocab); the LM head is the token embedding."""
        return F.linear(self.hidden_states(idx), self.wte.weight)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next-token predictions, without materialising the logits (see below)."""
        hidden = self.hidden_states(idx)
        return linear_cross_entropy(hidden.flatten(0, 1), self.wte.weight, targets.flatten(), reduction)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets), in row chunks, with the gradient computed on the way.

    With a large vocabulary the (tokens x vocab) logits dominate a small model's step: materialised in full,
    upcast to fp32, log-softmaxed, then a zero-filled gradient of the same size. Here each chunk's logits
    live only long enough to give its loss and gradients. Measured on 2 CPU cores, preset 1M with GPT-2's
    vocabulary, batch 8x512: 1.6x faster per step, peak memory 0.7 GB instead of 2.9 GB.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    scale = 1.0 / targets.numel() if reduction == "mean" else 1.0
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, scale)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, scale):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            needs_grad = any(ctx.needs_input_grad[:2])
            grad_hidden = torch.empty_like(hidden) if needs_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = max(1, (1 << 23) // weight.shape[0])  # ~32 MB of fp32 logits per chunk
            for start in range(0, h.shape[0], rows):
                h_chunk, t_chunk = h[start : start + rows], targets[start : start + rows]
                log_probs = torch.log_softmax(h_chunk @ w.T, dim=-1, dtype=torch.float32)
                total -= log_probs.gather(1, t_chunk[:, None]).sum()
                if needs_grad:
                    # d(loss)/d(logits) = softmax - one_hot, computed in place on the log-probabilities
                    grad = log_probs.exp_()
                    grad[torch.arange(len(t_chunk), device=grad.device), t_chunk] -= 1
                    grad = grad.mul_(scale).to(dtype)
                    grad_hidden[start : start + rows] = grad @ w
                    grad_weight += (grad.T @ h_chunk).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None
