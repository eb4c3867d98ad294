"""A GPT-2 language model, small enough to read top to bottom, with the usual variants as named pieces.

By default: pre-LayerNorm transformer blocks, learned position embeddings, a GELU MLP of 4x the width, and an
LM head tied to the token embedding. Attention goes through PyTorch's fused scaled_dot_product_attention,
reading past keys and values from a preallocated KV cache when decoding. Each variant is one ModelConfig field
(see config.py): rotary or no positions, RMSNorm, SwiGLU or ReLU² MLPs, grouped-query attention, QK-norm, an
untied head, parallel attention + MLP blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionPlan, document_ids, document_positions
from .config import ModelConfig


def make_norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    size = size or config.d_model
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=1e-5)
    return nn.LayerNorm(size, bias=config.bias)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on a CPU. There PyTorch draws one number from its generator per element
    (~5 ns each: 12-15% of the 10-minute recipe's step at dropout 0.1); here each 64-bit draw gives four 16-bit
    numbers, so p is rounded to a multiple of 1/65536. Elsewhere, under torch.compile, and with `packed = False`
    (a run resumed from a checkpoint made before these draws, which continues as it began), as nn.Dropout."""

    packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        if not (self.packed and eager_cpu and self.training and 0 < self.p < 1):
            return super().forward(x)
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


def rotary_tables(positions: torch.Tensor, head_size: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos and sin of each position's rotation angles (RoPE, Su et al. 2021), in the rotate-half layout of
    transformers' Llama so that weights move between the two unchanged. `positions`: (time) or (batch, time)."""
    inverse_frequencies = theta ** -(torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    angles = positions[..., None].float() * inverse_frequencies
    angles = torch.cat([angles, angles], dim=-1)
    if angles.dim() == 3:  # per-row positions (left-padded batch): broadcast over heads
        angles = angles[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.attention_dropout
        self.scale = config.attn_scale
        self.window = config.local_window if layer in config.local_layers else None
        # One matmul for q, k and v: fewer, larger kernels matter for tiny models. With grouped-query
        # attention k and v have fewer heads, each shared by n_head / n_kv_head query heads.
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        # QK-norm: RMS-normalised queries and keys keep attention logits bounded at high learning rates.
        self.q_norm = nn.RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=1e-5) if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary: tuple | None = None,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:  # fmt: skip
        batch, time, width = x.shape
        sizes = [self.n_head * self.head_size, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size]
        q, k, v = (t.view(batch, time, -1, self.head_size).transpose(1, 2) for t in self.qkv(x).split(sizes, dim=-1))
        if self.q_norm is not None:  # in fp32, as the norms' weights (autocast leaves RMSNorm alone)
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(layer, k, v)
            mask, causal = cache.mask, cache.causal
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if plan is not None and self.window is None:  # a whole sequence: the plan's kernel (see attention.py)
            return self.proj(plan(q, k, v, self.scale).transpose(1, 2).reshape(batch, time, width))
        if plan is not None and plan.documents is not None:  # local layers with documents: a dense mask
            mask, causal = plan.dense_mask(), False
        if self.window is not None and k.shape[2] > self.window:
            local = _local if cache is None else cache.local_mask  # a cache knows where its queries sit
            mask, causal = local(mask, q.shape[2], k.shape[2], self.window, q.device), False
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=self.scale
        )
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


def _local(mask: torch.Tensor | None, queries: int, keys: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal attention that also forgets keys `window` or more positions back (GPT-Neo's local layers).
    The queries are the last `queries` of the `keys` positions; `mask`, if given, is the causal (+ padding) mask."""
    key = torch.arange(keys, device=device)
    query = key[keys - queries :, None]
    near = (query - key[None, :] < window) & (key[None, :] <= query)
    return near if mask is None else mask & near


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        hidden = config.mlp_hidden
        # SwiGLU's gate and value projections are one matmul (halves of `up`), as q, k and v are above.
        gated = 2 if self.activation == "swiglu" else 1
        self.up = nn.Linear(config.d_model, gated * hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:  # GPT-2 used the tanh approximation of GELU; keep it so exported weights behave identically.
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.parallel = config.parallel_blocks
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = None if self.parallel else make_norm(config)
        self.mlp = MLP(config)
        self.drop = Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary: tuple | None = None,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:  # fmt: skip
        h = self.ln_1(x)
        if self.parallel:  # GPT-J / PaLM: attention and MLP read the same normalised input
            return x + self.drop(self.attn(h, cache, layer, rotary, plan)) + self.drop(self.mlp(h))
        x = x + self.drop(self.attn(h, cache, layer, rotary, plan))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model) if config.position == "learned" else None
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = None if config.tied_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Under bf16 on a CPU, whole-sequence attention runs in fp32 (usually faster there; training measures it)
        self.cpu_attention_fp32 = True
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

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head: the token embedding itself unless the config unties them."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # a tied LM head is counted once
        if not non_embedding:
            return total
        return total - self.wte.weight.numel() - (self.wpe.weight.numel() if self.wpe is not None else 0)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final (normalized) hidden state at every position of `idx` (batch, time).

        With a `cache`, `idx` continues the sequence the cache holds, and its keys and values are appended."""
        time = idx.shape[1]
        if cache is None and time > self.config.context_length:  # a cache checks its own capacity
            raise ValueError(f"sequence of {time} tokens exceeds context_length={self.config.context_length}")
        positions = torch.arange(time, device=idx.device) if cache is None else cache.begin(time)
        plan = None
        if cache is None:  # a whole sequence: attention may skip what it masks, and stories may be kept apart
            documents = document_ids(idx, self.config.eos_id) if self.config.document_mask else None
            dropout = self.config.attention_dropout if self.training else 0.0
            plan = AttentionPlan(self.config.attention, documents, dropout, self.cpu_attention_fp32)
            if documents is not None:  # each story's positions count from its own start
                positions = document_positions(idx, self.config.eos_id)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        rotary = None
        if self.config.position == "rope":
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            rotary = rotary_tables(positions, self.config.head_size, self.config.rope_theta, dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, rotary, plan)
        if cache is not None:
            cache.advance(time)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (batch, time, vocab)."""
        hidden = self.hidden_states(idx, cache)
        return F.linear(hidden, self.wte.weight) if self.lm_head is None else self.lm_head(hidden)

    def new_cache(self, batch_size: int, capacity: int, pad: torch.Tensor | None = None) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, capacity, pad, device=weight.device, dtype=weight.dtype)

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy of the next-token predictions, without materialising the logits (see below); with a
        (batch, time) boolean `mask`, of the positions it marks only."""
        hidden = self.hidden_states(idx)
        if mask is None:
            hidden, targets = hidden.flatten(0, 1), targets.flatten()
        else:
            hidden, targets = hidden[mask], targets[mask]
        return linear_cross_entropy(hidden, self.head_weight, targets, reduction)


class KVCache:
    """Keys and values of every layer, preallocated for `capacity` positions: a decoding step writes in place
    and allocates nothing. Rows may be left-padded to batch prompts of different lengths: the first `pad[r]`
    positions of row r are masked out of attention and positions count from its first real token."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, pad: torch.Tensor | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if capacity > config.context_length:
            raise ValueError(f"KV cache capacity {capacity} exceeds context_length={config.context_length}")
        shape = (config.n_layer, batch_size, config.kv_heads, capacity, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity, self.length = capacity, 0
        self.pad = pad.to(device) if pad is not None and bool(pad.any()) else None
        self.mask: torch.Tensor | None = None
        self.causal = False

    def begin(self, time: int) -> torch.Tensor:
        """Set up the attention mask for `time` new positions; return their position ids."""
        start, end = self.length, self.length + time
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions exceed its capacity of {self.capacity}")
        device = self.keys.device
        positions = torch.arange(start, end, device=device)
        if self.pad is None:  # the fast paths: plain causal prefill, or one new token that sees everything
            self.mask, self.causal = None, start == 0 and time > 1
            if start == 0 or time == 1:
                return positions
        keys = torch.arange(end, device=device)
        mask = keys[None, :] <= positions[:, None]  # (time, end): causal
        if self.pad is not None:
            mask = mask & (keys[None, None, :] >= self.pad[:, None, None])  # (batch, time, end)
            mask = mask[:, None]  # broadcast over heads
            positions = (positions[None, :] - self.pad[:, None]).clamp(min=0)
        self.mask, self.causal = mask, False
        return positions

    def advance(self, time: int) -> None:
        self.length += time

    def local_mask(self, mask: torch.Tensor | None, queries: int, keys: int, window: int, device) -> torch.Tensor:
        return _local(mask, queries, keys, window, device)  # the queries are the last of the keys

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (beam search: each surviving beam continues from its parent's cache)."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)


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


def _loss_chunk_rows(vocab_size: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows of logits per chunk of linear_cross_entropy: ~32 MB of fp32 logits, but ~8 MB in fp32 on a CPU where
    that still leaves 256 rows or more. The softmax's passes over a chunk then run from the cache: on a Zen 3
    (AVX2, no bf16) the 10-minute recipe's step (4,096 vocabulary: 512 rows, not 2,048) ran 9-10% faster. Fewer
    rows starve the matrix products (GPT-2's vocabulary at 41 rows: the `8M` preset's step 1.4x slower), and
    under bf16 autocast on an Intel Xeon with AMX smaller chunks measured no faster."""
    if device.type == "cpu" and dtype == torch.float32 and vocab_size <= 1 << 13:
        return (1 << 21) // vocab_size
    return max(1, (1 << 23) // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, scale):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            needs_grad = any(ctx.needs_input_grad[:2])
            grad_hidden = torch.empty_like(hidden) if needs_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = _loss_chunk_rows(weight.shape[0], hidden.device, dtype)
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
