"""The decode engine behind `generate`, `Storyteller` and `serve`: continuous batching over fixed KV-cache slots.

Every sequence owns one of `max_batch` slots of a KV cache preallocated once. A step (1) advances every decoding
sequence by one token in a single forward pass of static shape: each row attends over the whole preallocated
cache of its slot through a mask, so no tensor shape depends on how far a sequence has got, and the step can be
compiled (`torch.compile`: inductor's C++ code on a CPU, CUDA graphs on a GPU) to remove per-operation dispatch;
(2) prefills newly joined sequences in chunks of at most `prefill_chunk` tokens in all, so a long prompt never
stalls the others for long; (3) samples each sequence's next token with its own settings and its own
`torch.Generator`. A finished or cancelled sequence frees its slot at once; a waiting one takes it next step.

The engine only calls the model (its forward with a cache object), so any replacement of its Linear layers
(quantized weights, say) decodes here unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import abc, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .errors import UserError
from .model import _local


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. temperature 0 is greedy; top_k / top_p keep the likeliest tokens."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature}")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):  # True is no top_k
            raise UserError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of `logits` (batch, vocab), all rows drawing from `generator`."""
        return torch.tensor(sample(logits, [self] * len(logits), [generator] * len(logits)), device=logits.device)


def sample(
    logits: torch.Tensor, settings: abc.Sequence[Sampling], generators: abc.Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each row of `logits` (rows, vocab), row i with settings[i] and generators[i].

    The filtering and the draw are batched; each row's one random number comes from that row's generator (in row
    order, which matters only where rows share a generator), so a row's token depends on nothing but its own logits,
    settings and generator: never on which other rows are in the batch."""
    greedy = [s.greedy for s in settings]
    tokens = logits.argmax(dim=-1).tolist() if any(greedy) else [0] * len(settings)
    rows = [i for i, g in enumerate(greedy) if not g]
    if not rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    chosen = [settings[i] for i in rows]
    temperature = torch.tensor([s.temperature for s in chosen], device=device)
    scores = logits[rows].float() / temperature[:, None]
    top_k = [s.top_k if s.top_k is not None and s.top_k < vocab else vocab for s in chosen]
    if min(top_k) < vocab:  # keep each row's top_k largest (ties at the k-th value stay, as torch.topk's cut)
        kth = scores.sort(dim=-1, descending=True).values.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    nucleus = [j for j, s in enumerate(chosen) if s.top_p is not None and s.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([chosen[j].top_p for j in nucleus], device=device)[:, None]
        sorted_probs, order = probs[nucleus].sort(dim=-1, descending=True)
        # drop a token once the ones before it already cover top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs[nucleus] = probs[nucleus].scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # Inverse-CDF draw: one uniform number per row from the row's own generator. torch.multinomial would draw a
    # vocabulary's worth of exponentials per row, which made sampling a third of a batched decode step on a CPU.
    # side="right" never lands on a zero-probability token (the cumulative sum does not rise there).
    uniform = torch.stack([torch.rand((), generator=generators[i], device=device) for i in rows]).double()
    cdf = probs.double().cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], side="right").clamp_(max=vocab - 1)
    for i, token in zip(rows, drawn.flatten().tolist(), strict=True):
        tokens[i] = token
    return tokens


class SlotCache:
    """Keys and values of `slots` sequences, each up to `capacity` positions, preallocated once.

    During a decode step it is the model's cache for rows 0..b-1 (b the step's batch): row r writes its new key
    and value at `positions[r]` and attends over the whole capacity, masked to positions <= its own.

    One tensor per layer, not one for all layers: a compiled step writes each in place, where writes into slices
    of one shared tensor are compiled into a copy of the whole cache per layer."""

    def __init__(self, config: ModelConfig, slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        if capacity > config.context_length:
            raise ValueError(f"KV cache capacity {capacity} exceeds context_length={config.context_length}")
        shape = (slots, config.kv_heads, capacity, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots, self.capacity, self.dtype = slots, capacity, dtype
        self.key_index = torch.arange(capacity, device=device)
        # keys a decode step attends over: the whole capacity for the compiled step's static shape; eager steps
        # stop after the furthest row's position (a prompt of 40 tokens need not read 512 cached positions), and
        # where every row stands at that position (one sequence, say) they need no mask at all
        self.span, self.masked = capacity, True
        if device.type == "cuda":  # CUDA graphs: the buffers stay where they are, written in place
            for buffer in self.keys + self.values:
                torch._dynamo.mark_static_address(buffer)
        self.positions = self.rows = self.mask = None
        self.causal = False

    @property
    def bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.keys + self.values)

    def attend(self, positions: list[int], whole: bool) -> None:
        """How far the next decode step of rows at `positions` reads: the whole capacity (the compiled step's static
        shape), or up to the furthest row's position."""
        self.span = self.capacity if whole else max(positions) + 1
        self.masked = whole or min(positions) + 1 < self.span

    # The protocol model.GPT calls with a cache: begin, update, local_mask, advance (see model.KVCache).
    def begin(self, time: int) -> torch.Tensor:
        batch, heads, device = self.positions.shape[0], self.keys[0].shape[1], self.positions.device
        # where row r, head h writes, in a layer's cache seen as (slots * heads * capacity, head_size) rows:
        # one index_copy_ per layer instead of advanced indexing (several times slower on a CPU)
        row_heads = torch.arange(batch, device=device)[:, None] * heads + torch.arange(heads, device=device)
        self.rows = (row_heads * self.capacity + self.positions[:, None]).flatten()
        self.mask = (
            (self.key_index[None, : self.span] <= self.positions[:, None])[:, None, None, :] if self.masked else None
        )
        return self.positions[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, size = k.shape[0], k.shape[-1]
        # row r's key at positions[r] (cast: under autocast keys come in bf16 to a cache of the weights' dtype)
        self.keys[layer].view(-1, size).index_copy_(0, self.rows, k.reshape(-1, size).to(self.dtype))
        self.values[layer].view(-1, size).index_copy_(0, self.rows, v.reshape(-1, size).to(self.dtype))
        return self.keys[layer][:batch, :, : self.span], self.values[layer][:batch, :, : self.span]

    def local_mask(self, mask: torch.Tensor, queries: int, keys: int, window: int, device) -> torch.Tensor:
        near = ((self.positions[:, None] - self.key_index[None, : self.span]) < window)[:, None, None, :]
        return near if mask is None else mask & near

    def advance(self, time: int) -> None:  # positions live in the engine, per sequence
        pass


class _SlotPrefill:
    """The model's cache while it prefills positions [start, start + time) of one slot of a SlotCache."""

    def __init__(self, cache: SlotCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start
        self.mask: torch.Tensor | None = None
        self.causal = False

    def begin(self, time: int) -> torch.Tensor:
        end = self.start + time
        if end > self.cache.capacity:
            raise ValueError(f"KV cache full: {end} positions exceed its capacity of {self.cache.capacity}")
        positions = self.cache.key_index[self.start : end]
        self.end = end
        if self.start == 0:
            self.mask, self.causal = None, time > 1
        else:
            self.mask, self.causal = self.cache.key_index[None, :end] <= positions[:, None], False
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, slot = self.cache, self.slot
        keys, values = cache.keys[layer], cache.values[layer]
        keys[slot, :, self.start : self.end] = k[0]
        values[slot, :, self.start : self.end] = v[0]
        return keys[slot : slot + 1, :, : self.end], values[slot : slot + 1, :, : self.end]

    def local_mask(self, mask, queries: int, keys: int, window: int, device) -> torch.Tensor:
        return _local(mask, queries, keys, window, device)

    def advance(self, time: int) -> None:
        pass


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sequence in the engine: its tokens so far, where it stands, and how it ended."""

    tokens: list[int]  # prompt (as prefilled) and generated tokens
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None
    eos_id: int | None
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    filled: int = 0  # positions of the slot holding this sequence's tokens
    to_prefill: int = 0  # tokens of `tokens` from `filled` on still to prefill
    finish_reason: str | None = None  # "eos", "length", "cancelled", "error"
    cancelled: bool = False
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _bucket(size: int, limit: int) -> int:
    """The next power of two >= size (at most `limit`): a few static shapes, each compiled or graphed once."""
    return min(limit, 1 << max(0, size - 1).bit_length())


class Engine:
    """Continuous batching over `max_batch` KV-cache slots of `capacity` positions (default: the context).

    add() queues a sequence; step() runs one engine step and returns the (sequence, token) pairs it produced;
    cancel() ends a sequence, freeing its slot at the next step. Not thread-safe: one thread drives an engine.
    `compile`: compile the decode step (True), or not (False). Compiling happens on first use of each shape, or
    up front in warm_up()."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch: int = 8,
        capacity: int | None = None,
        compile: bool = False,
        prefill_chunk: int = 256,
    ) -> None:
        weight = model.wte.weight
        self.model, self.config, self.device = model, model.config, weight.device
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.cache = SlotCache(self.config, max_batch, capacity or self.config.context_length, weight.device,
                               weight.dtype)  # fmt: skip
        self.compiled = compile
        self._step_fn: Callable = _compiled_step(weight.device) if compile else _decode_step
        self._free = list(range(max_batch))  # a heap: the lowest free slot first keeps the batch buckets small
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.steps = 0
        self.isolate_errors = False  # serve sets it: a request that raises then fails alone

    def add(
        self,
        prompt: abc.Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Sequence:
        """Queue a sequence: a non-empty prompt, of which the last `capacity` tokens are kept."""
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        sequence = Sequence(list(prompt)[-self.cache.capacity :], max_new_tokens, sampling, generator, eos_id)
        sequence.to_prefill = len(sequence.tokens)
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        sequence.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[tuple[Sequence, int | None]]:
        """One decode step for every decoding sequence, then prefill chunks for joining ones; sample them all.

        The (sequence, token) pairs produced, in sequence order. With `isolate_errors`, a sequence whose
        prefill, decode or sampling raises ends alone (finish_reason "error", the exception in `.error`) and
        is reported with token None; otherwise the exception propagates."""
        self._drop_cancelled()
        self._admit()
        failed: list[Sequence] = []
        decoding = [s for s in self.running.values() if s.to_prefill == 0]
        groups = self._isolated(self._decode, decoding, failed) if decoding else []
        groups += self._prefill(failed)
        sequences = sorted((s for group, _ in groups for s in group), key=lambda s: s.id)
        if sequences:
            position = {s.id: i for i, s in enumerate(s for group, _ in groups for s in group)}
            logits = torch.cat([logits for _, logits in groups])[[position[s.id] for s in sequences]]
            tokens = self._sample(sequences, logits, failed)
        produced = [(s, t) for s, t in zip(sequences, tokens, strict=True) if t is not None] if sequences else []
        for sequence, token in produced:
            self._advance(sequence, token)
        self.steps += 1
        return sorted(produced + [(s, None) for s in failed], key=lambda pair: pair[0].id)

    def _isolated(self, run: Callable, sequences: list[Sequence], failed: list[Sequence]) -> list:
        """[(sequences, logits)] of run(sequences); if it raises, of each sequence alone, failing those that raise."""
        try:
            return [(sequences, run(sequences))]
        except Exception:
            if not self.isolate_errors:
                raise
        groups = []
        for sequence in sequences:
            try:
                groups.append(([sequence], run([sequence])))
            except Exception as error:  # noqa: PERF203 (rare: only after a failed step)
                self._fail(sequence, error, failed)
        return groups

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor, failed: list[Sequence]) -> list:
        try:
            return sample(logits, [s.sampling for s in sequences], [s.generator for s in sequences])
        except Exception:
            if not self.isolate_errors:
                raise
        tokens: list[int | None] = []
        for row, sequence in enumerate(sequences):
            try:
                tokens += sample(logits[row : row + 1], [sequence.sampling], [sequence.generator])
            except Exception as error:  # noqa: PERF203
                self._fail(sequence, error, failed)
                tokens.append(None)
        return tokens

    def _fail(self, sequence: Sequence, error: Exception, failed: list[Sequence]) -> None:
        sequence.error = error
        self._finish(sequence, "error")
        failed.append(sequence)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(sequence)
            sequence.finish_reason = "cancelled"
        for sequence in [s for s in self.running.values() if s.cancelled]:
            self._finish(sequence, "cancelled")

    def _admit(self) -> None:
        while self.waiting and self._free:
            sequence = self.waiting.popleft()
            sequence.slot = heapq.heappop(self._free)
            self.running[sequence.slot] = sequence

    def _decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Logits after feeding each sequence's last token at its next position, in one static-shape pass."""
        batch = _bucket(max(s.slot for s in sequences) + 1, self.max_batch)
        # rows of other slots write to their next free position, which is rewritten before anything reads it
        tokens, positions = [0] * batch, [0] * batch
        for slot, other in self.running.items():
            if slot < batch:
                positions[slot] = min(other.filled, self.cache.capacity - 1)
        for sequence in sequences:
            tokens[sequence.slot], positions[sequence.slot] = sequence.tokens[-1], sequence.filled
        self.cache.attend(positions, whole=self.compiled)
        tokens_t = torch.tensor(tokens, device=self.device)[:, None]
        positions_t = torch.tensor(positions, device=self.device)
        logits = self._step_fn(self.model, self.cache, tokens_t, positions_t)
        for sequence in sequences:
            sequence.filled += 1
        return logits[torch.tensor([s.slot for s in sequences], device=self.device)]

    def _prefill(self, failed: list[Sequence]) -> list[tuple[list[Sequence], torch.Tensor]]:
        """Prefill chunks of joining sequences, oldest first, up to `prefill_chunk` tokens in all (at least one
        chunk): [([sequence], logits after its last token)] for each whose prompt is now all in the cache."""
        budget, ready = self.prefill_chunk, []
        for sequence in sorted(self.running.values(), key=lambda s: s.id):
            if sequence.to_prefill == 0:
                continue
            if budget <= 0:
                break
            size = min(sequence.to_prefill, budget)
            budget -= size
            ready += self._isolated(lambda group, size=size: self._prefill_chunk(group[0], size), [sequence], failed)
        return [(group, logits) for group, logits in ready if logits is not None]

    @torch.inference_mode()
    def _prefill_chunk(self, sequence: Sequence, size: int) -> torch.Tensor | None:
        start = len(sequence.tokens) - sequence.to_prefill
        chunk = torch.tensor([sequence.tokens[start : start + size]], device=self.device)
        logits = self.model(chunk, _SlotPrefill(self.cache, sequence.slot, sequence.filled))
        sequence.filled += size
        sequence.to_prefill -= size
        return logits[:, -1] if sequence.to_prefill == 0 else None

    def _advance(self, sequence: Sequence, token: int) -> None:
        sequence.tokens.append(token)
        sequence.generated.append(token)
        if sequence.eos_id is not None and token == sequence.eos_id:
            self._finish(sequence, "eos")
        elif len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length")
        elif sequence.filled == self.cache.capacity:  # out of room: slide to the most recent half and prefill
            keep = self.cache.capacity // 2
            sequence.tokens = sequence.tokens[-keep:]
            sequence.filled, sequence.to_prefill = 0, keep

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.finish_reason = reason
        if sequence.slot is not None and self.running.get(sequence.slot) is sequence:
            del self.running[sequence.slot]
            heapq.heappush(self._free, sequence.slot)
        if sequence in self.waiting:
            self.waiting.remove(sequence)

    def warm_up(self, step_fn: Callable | None = None, cache: SlotCache | None = None) -> float:
        """Run (and so compile) the decode step at every batch size it will use; the seconds it took. Only while
        no sequence runs, or on a scratch `cache` of the same shape."""
        step_fn, cache = step_fn or self._step_fn, cache or self.cache
        cache.attend([cache.capacity - 1], whole=step_fn is not _decode_step)  # the shape it will be called with
        started = time.perf_counter()
        for size in self.batch_sizes:
            tokens = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            positions = torch.full((size,), cache.capacity - 1, device=self.device)
            for _ in range(3):  # CUDA graphs are recorded on the second or third call
                step_fn(self.model, cache, tokens, positions)
        _synchronize(self.device)
        return time.perf_counter() - started

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})

    def use_compiled(self) -> None:
        self._step_fn, self.compiled = _compiled_step(self.device), True


def measure_compile(engine: Engine, force: bool = False, steps: int = 20) -> str:
    """Compile `engine`'s decode step and time it against eager at batch 1 and `max_batch`, with rows halfway
    through the cache (where eager steps read half of what the compiled one reads), on a scratch cache (so that it
    may run beside live decoding; on a GPU before serving, on the engine's own cache, which its CUDA graphs then
    use); keep it if it is faster at both (or if `force`). What it found, in words. The compile takes seconds to
    minutes: worth it for a server, not for one story."""
    if engine.device.type == "cuda" and not engine.busy:  # before serving: CUDA graphs are recorded for its cache
        cache = engine.cache
    else:
        cache = SlotCache(engine.config, engine.max_batch, engine.cache.capacity, engine.device, engine.cache.dtype)
    sizes = sorted({1, engine.max_batch})

    def per_token(step_fn: Callable, compiled: bool) -> list[float]:
        times = []
        for size in sizes:
            tokens = torch.zeros(size, 1, dtype=torch.long, device=engine.device)
            # rows mid-story, where a story's average step stands: eager steps read the cache up to there
            at = [(cache.capacity // 2 + row) % cache.capacity for row in range(size)]
            cache.attend(at, whole=compiled)
            positions = torch.tensor(at, device=engine.device)
            step_fn(engine.model, cache, tokens, positions)
            _synchronize(engine.device)
            started = time.perf_counter()
            for _ in range(steps):
                step_fn(engine.model, cache, tokens, positions)
            _synchronize(engine.device)
            times.append((time.perf_counter() - started) / steps)
        return times

    eager = per_token(_decode_step, compiled=False)
    compiled_fn = _compiled_step(engine.device)
    seconds = engine.warm_up(compiled_fn, cache)
    compiled = per_token(compiled_fn, compiled=True)
    speedups = [e / c for e, c in zip(eager, compiled, strict=True)]
    pays = all(s > 1.1 for s in speedups)
    if pays or force:
        engine.use_compiled()
    figures = ", ".join(f"batch {n}: {e * 1e3:.2f} -> {c * 1e3:.2f} ms/step ({s:.2f}x)"
                        for n, e, c, s in zip(sizes, eager, compiled, speedups, strict=True))  # fmt: skip
    verdict = "using it" if pays else ("using it as asked" if force else "staying eager")
    return f"compiled decode step: {seconds:.0f} s to compile; {figures}; {verdict}"


def _step(model: torch.nn.Module, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cache.positions = positions
    return model(tokens, cache)[:, -1]


_decode_step = torch.inference_mode()(_step)


_COMPILED: dict[str, Callable] = {}


def _compiled_step(device: torch.device) -> Callable:
    """The decode step through torch.compile: CUDA graphs on a GPU (mode reduce-overhead), inductor elsewhere.
    One compiled function per device type, so engines of the same shapes share its compiled code.

    On a CPU, inductor's C++ wrapper calls the step's ~50 kernels and 33 matrix products from C++ rather than
    from Python: measured on a 2-core Xeon (Cascade Lake), 1.3-1.5x faster per step for the 1M preset at batch
    1 and 8, 1.1-1.2x for 8M, for ~7 s more of a cold compile (31 -> 38 s)."""
    if device.type not in _COMPILED:
        if device.type == "cuda":
            compiled = torch.compile(_step, mode="reduce-overhead")
        else:
            compiled = torch.compile(_step, options={"cpp_wrapper": True})

        @torch.inference_mode()
        def step(model, cache, tokens, positions):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(model, cache, tokens, positions).clone()
            return compiled(model, cache, tokens, positions)

        _COMPILED[device.type] = step
    return _COMPILED[device.type]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
