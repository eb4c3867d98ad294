"""Causal self-attention over whole sequences (training, evaluation), optionally masked per story.

With document masking, the end-of-story token starts a new document and a position attends only to earlier
positions of its own document, so packing stories into one window never lets one story see another. Three
kernels compute the same thing; `attention = auto` picks one per shape by measuring them, as training picks
its precision:
- `sdpa`: PyTorch's fused scaled_dot_product_attention, causal; with documents, a dense (time x time) mask.
- `blocked`: with documents, causal SDPA on each story separately, so the pairs across stories — about 2/3 of
  a 512-token window of ~200-token stories — are never computed. On a CPU it was measured slower than the dense
  mask (Xeon Cascade Lake, torch 2.13): the CPU flash kernel's cost per pair is several times higher on short
  sequences than on one long one — hence measuring, not assuming. Without documents, on a CPU, causal attention
  in two halves (`CausalHalves`): PyTorch's CPU flash kernel skips whole blocks of keys only, so in a causal
  window up to 512 long the pairs above the diagonal cost as much as the others (measured: causal and unmasked
  alike); the halves compute 3/4 of the pairs (through private ops, checked against SDPA once per process).
  Elsewhere plain causal SDPA, whose CUDA kernels skip them.
- `flex`: torch.nn.attention.flex_attention with a causal (+ document) block mask, compiled. Its CPU
  version (inductor, needs a C++ compiler) has no backward in torch <= 2.13: on CPU it serves evaluation only.
KV-cache decoding does not come here (see model.KVCache): a prompt is decoded as one story.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import UserError

KERNELS = ("auto", "sdpa", "flex", "blocked")
_chosen: dict[tuple, str] = {}  # auto's measured choice per shape and device
_told: set[str] = set()  # fallback lines already printed


def document_ids(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, time) document number of each position: an end-of-story token opens the next document (stories
    follow EOS in the data, and prompts start with it)."""
    return (idx == eos_id).cumsum(dim=1)


def document_positions(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, time) position of each token within its document, so that a story is embedded alike wherever
    it sits in a window."""
    index = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    starts = torch.where(idx == eos_id, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - starts


def flex_problem(device: torch.device, training: bool) -> str | None:
    """Why flex_attention cannot run here, or None when it can."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention (it needs torch >= 2.5)"
    if device.type == "cpu":
        if training:
            return f"torch {torch.__version__} has no flex_attention backward on CPU"
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "flex_attention on CPU compiles with inductor, which needs a C++ compiler (g++ or clang++)"
    elif device.type != "cuda":
        return f"flex_attention does not run on {device.type}"
    return None


class AttentionPlan:
    """How every layer of one forward pass attends: the kernel, and the document structure computed once."""

    def __init__(
        self, kernel: str, documents: torch.Tensor | None, dropout: float = 0.0, cpu_fp32: bool = True
    ) -> None:
        if kernel not in KERNELS:
            raise UserError(f"attention must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel, self.documents, self.dropout, self.cpu_fp32 = kernel, documents, dropout, cpu_fp32
        self._mask: torch.Tensor | None = None
        self._lengths: list[list[int]] | None = None
        self._block_mask = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Attention of (batch, heads, time, head size) queries, keys and values."""
        dtype = q.dtype
        if q.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or not self.cpu_fp32:
            return self.run(self.resolve(q, scale), q, k, v, scale)
        # PyTorch's CPU attention kernels mostly run slower in bf16 than in fp32, casts included (forward +
        # backward, AMD Zen 4, benchmarks/attention_dtype.py: 1.1-1.3x at the recipes' shapes), but not always (1.4x
        # faster in bf16 at 16 heads of 4 and context 512): training measures which (trainer.choose_precision).
        # Autocast would cast fp32 inputs back down: off here.
        with torch.autocast("cpu", enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            return self.run(self.resolve(q, scale), q, k, v, scale).to(dtype)

    def run(self, kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        if kernel == "flex":
            return _compiled_flex()(q, k, v, block_mask=self.block_mask(q), scale=scale)
        if self.documents is None:
            if kernel == "blocked":
                problem = halves_problem(q.device, q.shape[2], self.dropout)
                if problem is None:
                    return CausalHalves.apply(q, k, v, scale)
                if q.device.type == "cpu" and self.dropout:  # a setting, not a batch's length: say so
                    _tell(f"attention blocked: {problem}; causal SDPA instead")
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout, scale=scale)
        if kernel == "blocked":
            return self.blocked(q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask(), dropout_p=self.dropout, scale=scale)

    def dense_mask(self) -> torch.Tensor:
        """(batch, 1, time, time): causal and within one document."""
        if self._mask is None:
            docs = self.documents
            same = docs[:, :, None] == docs[:, None, :]
            self._mask = (same & torch.ones_like(same[0], dtype=torch.bool).tril())[:, None]
        return self._mask

    def blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Causal SDPA on each document of each row: the square diagonal blocks of the document mask."""
        if self._lengths is None:  # one host sync per forward pass, shared by the layers
            self._lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in self.documents]
        rows = []  # unbind and split, not slicing: their backward is one stack or cat, not a zero-filled copy each
        for lengths, *row in zip(self._lengths, q.unbind(0), k.unbind(0), v.unbind(0), strict=True):
            parts = zip(*(t[None].split(lengths, dim=2) for t in row), strict=True)  # 4-d: SDPA's fused kernels
            rows.append(torch.cat([F.scaled_dot_product_attention(*p, is_causal=True, dropout_p=self.dropout,
                                                                  scale=scale) for p in parts], dim=2))  # fmt: skip
        return torch.cat(rows)

    def block_mask(self, q: torch.Tensor):  # noqa: ANN201 (flex_attention's BlockMask, imported lazily)
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            docs, time_ = self.documents, q.shape[2]
            if docs is None:
                self._block_mask = create_block_mask(_causal, None, None, time_, time_, device=q.device)
            else:

                def same_story(b, h, query, key):  # noqa: ANN001, ANN202 (flex's mask_mod signature)
                    return (query >= key) & (docs[b, query] == docs[b, key])

                self._block_mask = create_block_mask(same_story, docs.shape[0], None, time_, time_, device=q.device)
        return self._block_mask

    def resolve(self, q: torch.Tensor, scale: float | None) -> str:
        """The kernel to use for this shape: the configured one after checking that it can run, or auto's."""
        training = torch.is_grad_enabled() and q.requires_grad
        if self.kernel == "flex":
            problem = flex_problem(q.device, training) or ("flex_attention has no dropout" if self.dropout else None)
            if problem:
                raise UserError(f"attention flex: {problem}; use attention = auto, blocked or sdpa")
            return "flex"
        if self.kernel != "auto":
            return self.kernel
        if self.documents is None:  # training measures the halves once at its start (choose_causal_kernel)
            return "sdpa"
        # flex is auto's candidate on CUDA only: on CPU it cannot train, and its forward was not faster there.
        problem = flex_problem(q.device, training) or ("flex_attention has no dropout" if self.dropout else None)
        candidates = ["blocked", "sdpa"] + (["flex"] if q.device.type == "cuda" and problem is None else [])
        key = (q.device.type, training, q.dtype, *q.shape)
        if key not in _chosen:
            _chosen[key] = self.measure(candidates, q, scale, training)
        if problem is not None and (training or q.device.type == "cuda"):
            _tell(f"attention auto: {problem}; masking stories with {_chosen[key]} instead of flex")
        return _chosen[key]

    def measure(self, candidates: list[str], q: torch.Tensor, scale: float | None, training: bool) -> str:
        """The fastest candidate on this batch's shape and documents: forward (+ backward when training)."""
        timings = {}
        with torch.random.fork_rng(devices=[]):  # no dropout draws may shift the run's RNG stream
            inputs = [q.detach().clone().requires_grad_(training) for _ in range(3)]
            for kernel in candidates:
                try:
                    for _ in range(2):  # the first is a warm-up (and flex's compilation)
                        timings[kernel] = self._time(kernel, inputs, scale, training)
                except Exception as error:  # e.g. flex's Triton kernels refuse heads smaller than 16
                    timings.pop(kernel, None)
                    _tell(f"attention auto: {kernel} cannot run this shape ({type(error).__name__}); not using it")
        return min(timings, key=timings.get)

    def _time(self, kernel: str, inputs: list[torch.Tensor], scale: float | None, training: bool) -> float:
        _sync(inputs[0].device)
        started = time.perf_counter()
        out = self.run(kernel, *inputs, scale)
        if training:
            out.sum().backward()
        _sync(inputs[0].device)
        return time.perf_counter() - started


def halves_problem(device: torch.device, time_: int, dropout: float) -> str | None:
    """Why CausalHalves cannot attend over `time_` positions here, or None when it can."""
    if device.type != "cpu" or not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "the halves use PyTorch's CPU flash-attention kernel"
    if torch.compiler.is_compiling():
        return "the halves are not compiled"
    if dropout:
        return "the halves have no dropout"
    if time_ % 2:
        return "the halves need an even length"
    return _halves_check()


@functools.cache
def _halves_check() -> str | None:
    """Why the halves disagree with causal SDPA in this torch, or None. They call private flash-attention ops
    (the only ones that return the log-sum-exp), tested on torch 2.13 only: once per process, a tiny case in the
    model's layout checks their output and gradients before any run trusts them."""
    qkv = torch.randn(2, 8, 3 * 2 * 4, generator=torch.Generator().manual_seed(0))  # 2 rows, 2 heads of 4, 8 long
    results = []
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        for kernel in CAUSAL_KERNELS.values():
            leaf = qkv.clone().requires_grad_()
            try:
                out = on_projection(kernel, leaf, heads=2)
                out.backward(torch.ones_like(out))
            except Exception as error:  # an op missing or with another signature
                return _halves_failed(f"{type(error).__name__}: {error}".splitlines()[0])
            results.append((out.detach(), leaf.grad))
    for ours, reference in zip(results[1], results[0], strict=True):
        if not torch.allclose(ours, reference, atol=1e-4, rtol=1e-4):
            return _halves_failed("their results differ")
    return None


def _halves_failed(why: str) -> str:
    problem = f"the halves failed their check against SDPA on torch {torch.__version__} ({why})"
    _tell(f"attention: {problem}; causal SDPA instead")
    return problem


def choose_causal_kernel(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, dropout: float) -> str:
    """`attention = auto`'s kernel for causal attention without documents over (batch, heads, time, head size)
    in `dtype`: "blocked" (CausalHalves) where it measures 10% faster than SDPA's causal kernel, forward + backward
    (best of 3 alternating rounds after a warm-up, on random inputs: no RNG draws), else "sdpa". Training calls
    it once at a run's start and records a "blocked" choice in the model config, so a resumed run attends alike."""
    if halves_problem(device, shape[2], dropout) is not None:
        return "sdpa"
    batch, heads, time_, size = shape
    qkv = torch.randn(batch, time_, 3 * heads * size, generator=torch.Generator().manual_seed(0))
    qkv = qkv.to(dtype).requires_grad_()
    best = dict.fromkeys(CAUSAL_KERNELS, float("inf"))
    for round_ in range(4):
        for name, kernel in CAUSAL_KERNELS.items():
            started = time.perf_counter()
            on_projection(kernel, qkv, heads).sum().backward()
            if round_:
                best[name] = min(best[name], time.perf_counter() - started)
    return "blocked" if best["blocked"] < 0.9 * best["sdpa"] else "sdpa"  # a near-tie keeps SDPA, run after run


def _fold(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, 2 * half, ...) -> (2 * batch, heads, half, ...): the two halves of each row as rows (a view
    for the model's layout, where the time axis strides over the heads)."""
    return x.unflatten(2, (2, x.shape[2] // 2)).transpose(1, 2).flatten(0, 1)


def _unfold(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """_fold's inverse, written into `out`."""
    out.unflatten(2, (2, out.shape[2] // 2)).transpose(1, 2).copy_(x.unflatten(0, (out.shape[0], 2)))
    return out


class CausalHalves(torch.autograd.Function):
    """Exact causal attention as three quarters of the pairs: the two diagonal halves (causal, one kernel call
    with the halves as rows) and the second half's queries over the first half's keys (no mask), merged by
    their log-sum-exps. The backward gives PyTorch's flash backward each part with the merged output and
    log-sum-exp, which makes each part's gradients exact, as ring attention does across devices."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:  # noqa: ANN001
        batch, heads, time_, size = q.shape
        first, second = slice(None, time_ // 2), slice(time_ // 2, None)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        diagonal, diagonal_lse = flash(_fold(q), _fold(k), _fold(v), 0.0, True, scale=scale)
        across, across_lse = flash(q[:, :, second], k[:, :, first], v[:, :, first], 0.0, False, scale=scale)
        out = _unfold(diagonal, q.new_empty(batch, time_, heads, size).transpose(1, 2))  # the caller's layout
        lse = _unfold(diagonal_lse, diagonal_lse.new_empty(batch, heads, time_))
        merged = torch.logaddexp(lse[:, :, second], across_lse)
        out[:, :, second] = (out[:, :, second].float() * (lse[:, :, second] - merged).exp()[..., None]
                             + across.float() * (across_lse - merged).exp()[..., None])  # fmt: skip
        lse[:, :, second] = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        first, second = slice(None, q.shape[2] // 2), slice(q.shape[2] // 2, None)
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        parts = flash_backward(*map(_fold, (grad, q, k, v, out, lse)), 0.0, True, scale=ctx.scale)
        dq, dk, dv = (_unfold(part, torch.empty_like(x)) for part, x in zip(parts, (q, k, v), strict=True))
        across = flash_backward(grad[:, :, second], q[:, :, second], k[:, :, first], v[:, :, first], out[:, :, second],
                                lse[:, :, second], 0.0, False, scale=ctx.scale)  # fmt: skip
        dq[:, :, second] += across[0]
        dk[:, :, first] += across[1]
        dv[:, :, first] += across[2]
        return dq, dk, dv, None


CAUSAL_KERNELS = {  # causal attention of (q, k, v) without documents, by the two kernels a CPU chooses between
    "sdpa": functools.partial(F.scaled_dot_product_attention, is_causal=True),
    "blocked": functools.partial(CausalHalves.apply, scale=None),
}


def on_projection(kernel: Callable, qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """`kernel` on views of one (batch, time, 3 x width) qkv projection, as the model calls attention (SDPA runs
    ~15% slower on such views than on contiguous inputs at the `1M` preset's shape)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    return kernel(q, k, v)


def _causal(b, h, query, key):  # noqa: ANN001, ANN202 (flex's mask_mod signature)
    return query >= key


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tell(line: str) -> None:
    """Print a fallback line once per process."""
    if line not in _told:
        _told.add(line)
        print(line, file=sys.stderr)
