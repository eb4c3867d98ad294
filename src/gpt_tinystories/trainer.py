"""The training loop: AdamW with warmup + cosine decay, accumulation, autocast, exact resume.

`train(config, run_dir)` is the whole job: tokenizer, data, model, loop, evaluation, checkpoints. Every batch
is a pure function of (seed, step), and the weights, optimizer and RNG state are checkpointed together, so a
resumed CPU run reproduces an uninterrupted one bit for bit.

It is built from small parts: `_set_up()` returns a `Run` (everything fixed for the run: data, model,
optimizers, `Evaluator`, `Checkpointer`, log) and a `TrainState` (where the run is); `train_step()` is one
optimizer step; `_loop()` repeats it until the budget is spent or a signal arrives, evaluating and
checkpointing on schedule through `_report()`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import atomic, checkpoint
from .attention import choose_causal_kernel
from .checkpoint import Checkpointer
from .config import NARROW_BELOW_PASSES, ModelConfig, TrainConfig, parse_duration
from .data import TokenWindows, is_hub_id, is_prepared, iter_stories, prepare
from .distributed import DataParallelLoss, Distributed
from .errors import UserError
from .evaluate import Evaluator
from .metrics import LOG, METRICS, PLOT, RunLog
from .model import GPT, Dropout
from .runtime import autocast_for, keep_freed_memory, peak_memory_mb
from .tokenizer import TOKENIZER_FILE, Tokenizer

BPE_TRAINING_CHARS = 200_000_000  # a 4096-token BPE needs far less text than the whole dataset
AUTO_DROPOUT, AUTO_DROPOUT_PASSES = 0.1, 15  # see auto_dropout
TIMING_DROP_RATIO = 5.0  # see _time_rows: far above one slow timing's 2-3x on a busy machine


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    val_bpb: float | None
    sample: str | None  # evaluate.SAMPLE_PROMPT and its continuation at the last evaluation
    stopped_by_signal: int | None = None
    rank: int = 0  # under torchrun, only rank 0 evaluates, saves and reports


# -- setup ---------------------------------------------------------------------------------------
def load_tokenizer(spec: str, data: str) -> Tokenizer:
    """`gpt2`, `bpe-N` (a BPE of N tokens trained on the first stories of `data`), or a tokenizer.json path."""
    if spec.startswith("bpe-") and spec[4:].isdigit():
        if is_prepared(data):
            raise UserError(f"--data {data} is prepared data: pass the --tokenizer it was prepared with, not {spec}")
        return Tokenizer.train(_first_chars(iter_stories(data, "train"), BPE_TRAINING_CHARS), int(spec[4:]))
    if spec != "gpt2" and not Path(spec).exists():
        raise UserError(f"tokenizer {spec!r} not found; use gpt2, bpe-N (e.g. bpe-4096) or a tokenizer.json path")
    return Tokenizer.load(spec)


def _first_chars(stories: Iterator[str], limit: int) -> Iterator[str]:
    total = 0
    for story in stories:
        yield story
        total += len(story)
        if total >= limit:
            return


def choose_precision(requested: str, device: torch.device, model: GPT,
                     batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[str, str]:  # fmt: skip
    """(autocast precision, the precision attention runs in under it). bf16 autocast where it is faster: always on
    CUDA with bf16, measured on CPUs (it depends on AVX-512 BF16): 10% faster than fp32. On a CPU, attention under
    bf16 then runs in bf16 where that measures 10% faster than in fp32 at this shape, else in fp32 (see
    attention.AttentionPlan). The margins keep a near-tie from going one way in one run and the other in the next."""
    if device.type != "cpu" or requested == "fp32":
        if requested == "auto":
            requested = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return requested, requested  # off a CPU, attention follows autocast
    candidates = [("fp32", "fp32")] if requested == "auto" else []
    candidates += [("bf16", "bf16"), ("bf16", "fp32")]
    best = _time_rows(model, batch, device, candidates)
    in_bf16, in_fp32 = candidates[-2:]  # attention's precision under bf16: a near-tie keeps fp32, run after run
    bf16 = in_bf16 if best[in_bf16] < 0.9 * best[in_fp32] else in_fp32
    if requested == "auto" and best[bf16] >= 0.9 * best["fp32", "fp32"]:
        return "fp32", "fp32"
    return bf16


def _time_rows(model: GPT, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
               candidates: list[tuple[str, str]]) -> dict[tuple[str, str], float]:  # fmt: skip
    """Seconds per row of forward + backward over (up to) 4 rows of `batch`, for each (precision, attention
    precision): the best of three alternating rounds after a warm-up (within a few % of each other, one timing
    each flipped the choice). A candidate TIMING_DROP_RATIO times as slow as the fastest in the first timed
    round runs no more: on a CPU without native bf16 (a Zen 3) bf16 autocast's four rounds made the `8M` preset's
    start wait 286 s, its two 147 s. Leaves no trace: no gradients, no RNG draws."""
    inputs, targets = (t[:4].to(device) for t in batch)
    timings: dict[tuple[str, str], list[float]] = {c: [] for c in candidates}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for attempt in range(4):
            if attempt == 2:
                fastest = min(times[1] for times in timings.values())
                candidates = [c for c in candidates if timings[c][1] < TIMING_DROP_RATIO * fastest]
            for precision, attention in candidates:
                model.cpu_attention_fp32 = attention == "fp32"
                started = time.perf_counter()
                with autocast_for(device, precision):
                    loss = model.loss(inputs, targets)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings[precision, attention].append((time.perf_counter() - started) / len(inputs))
    model.zero_grad(set_to_none=True)
    model.cpu_attention_fp32 = True
    return {candidate: min(times[1:]) for candidate, times in timings.items()}


def auto_dropout(passes: float) -> float:
    """What `dropout = "auto"` becomes for a run planned to pass over its training data `passes` times: none
    for a few passes, AUTO_DROPOUT once the model starts to memorise the text. Measured on the 10-minute recipe
    (docs/study-cpu-10min.md, Dropout by passes): 0.1 lost at ~9 and ~13 passes, gained 0.010-0.014 at ~17 and
    0.033-0.036 at ~30."""
    return AUTO_DROPOUT if passes >= AUTO_DROPOUT_PASSES else 0.0


def make_optimizers(model: GPT, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW; or Muon for the blocks' weight matrices and AdamW for embeddings, head, norms and biases."""
    matrices = [p for block in model.blocks for p in block.parameters() if p.dim() == 2]
    if config.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f"optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks; upgrade")
        # Moonshot's learning-rate adjustment matches AdamW's update size, so lr and weight decay carry over.
        muon = torch.optim.Muon(matrices, lr=config.lr, weight_decay=config.weight_decay,
                                adjust_lr_fn="match_rms_adamw")  # fmt: skip
        taken = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in taken]
        return [muon, _adamw(rest, config, device)]
    return [_adamw(list(model.parameters()), config, device)]


def _adamw(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings only: decaying biases and norm gains only hurts.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}  # CPU: 2.8x foreach
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **fused)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then the schedule as `progress` goes 0 -> 1: cosine decay to
    min_lr_ratio * lr, constant, or warmup-stable-decay (constant, then linear decay over decay_fraction)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress, floor = min(max(progress, 0.0), 1.0), config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":
        decayed = max(0.0, progress - (1 - config.decay_fraction)) / config.decay_fraction
        return config.lr - (config.lr - floor) * decayed
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


# -- the run -------------------------------------------------------------------------------------
class _Budget:
    """Where the run is between start and its first-reached limit (steps, tokens, epochs or time)."""

    def __init__(self, config: TrainConfig, tokens_per_step: int, windows_per_step: int, num_windows: int) -> None:
        limits = []
        if config.max_steps is not None:
            limits.append(config.max_steps)
        if config.max_tokens is not None:
            limits.append(math.ceil(config.max_tokens / tokens_per_step))
        if config.max_epochs is not None:
            limits.append(math.ceil(config.max_epochs * num_windows / windows_per_step))
        self.total_steps = min(limits) if limits else None
        self.max_seconds = parse_duration(config.max_time) if config.max_time is not None else None
        self.warmup = config.warmup_steps
        self.windows_per_step, self.num_windows = windows_per_step, num_windows

    def progress(self, step: int, seconds: float) -> float:
        """Fraction of the decay phase done: by steps, or by wall time for a time-only budget."""
        parts = [seconds / self.max_seconds] if self.max_seconds else []
        if self.total_steps is not None:
            parts.append((step - self.warmup) / max(self.total_steps - self.warmup, 1))
        return max(parts)

    def passes(self, seconds_per_step: float | None) -> float:
        """How many times the run will pass over its training data: by its step limit, or by its time limit at
        `seconds_per_step`, whichever comes first."""
        steps = [self.total_steps] if self.total_steps is not None else []
        if self.max_seconds is not None and seconds_per_step:
            steps.append(self.max_seconds / seconds_per_step)
        return min(steps, default=math.inf) * self.windows_per_step / self.num_windows

    def done(self, step: int, seconds: float) -> bool:
        return (self.total_steps is not None and step >= self.total_steps) or (
            self.max_seconds is not None and seconds >= self.max_seconds
        )


RUN_DIR_OUTPUTS = ("config.json", TOKENIZER_FILE, METRICS, LOG, PLOT, "wandb-id.txt", "wandb", checkpoint.CHECKPOINTS)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run dir that is a file, or whose outputs are symlinks out of it (training would write, and
    prune, outside it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; choose a folder for the run")
    root = run_dir.resolve()
    paths = [run_dir / name for name in RUN_DIR_OUTPUTS]
    if (run_dir / checkpoint.CHECKPOINTS).is_dir():
        paths += sorted((run_dir / checkpoint.CHECKPOINTS).iterdir())
    for path in paths:
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise UserError(
                f"{path} is a symlink to {path.resolve()}, outside the run dir {run_dir}; training would write "
                "there: remove the link or choose another --out"
            )


# -- the run: what is set up once, and where it is ------------------------------------------------
@dataclass
class Run:
    """Everything fixed for the length of a run, built by `_set_up()`."""

    config: TrainConfig
    run_dir: Path
    world: Distributed
    tokenizer: Tokenizer
    model: GPT
    eval_model: GPT  # the model itself, or under FSDP rank 0's gathered copy
    loss_fn: DataParallelLoss
    optimizers: list[torch.optim.Optimizer]
    train_windows: TokenWindows
    evaluator: Evaluator
    checkpointer: Checkpointer
    budget: _Budget
    accumulation: int  # micro-steps per optimizer step
    windows_per_step: int  # over all ranks
    precision: str
    attention_precision: str  # what attention runs in under `precision` (see choose_precision)
    autocast: contextlib.AbstractContextManager
    planned: Planned
    log: RunLog | _Silent

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.config.context_length


@dataclass
class Planned:
    """What a new run's start chose by the passes over its data it planned (at the measured speed)."""

    dropout_passes: float | None = None  # with dropout "auto": the passes its dropout was chosen for
    narrowed_from: tuple[int, float] | None = None  # narrow_d_model taken: the width set, the passes planned at it


@dataclass
class TrainState:
    """Where the run is. The first four fields are what a checkpoint records and a resumed run restores."""

    step: int = 0
    train_seconds: float = 0.0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient: in all,
    bad_in_a_row: int = 0  # and the current streak
    unsettled: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, skipped?) not read yet
    last_saved: int = -1  # the step of the newest checkpoint (resumed from or written), -1 for none
    last_eval: int = -1
    val_loss: float | None = None  # the last evaluation's figures
    val_bpb: float | None = None
    sample: str | None = None
    rate_step: int = 0  # where the window of the logged tokens/s began: the last log, evaluation or checkpoint
    rate_start: float = field(default_factory=time.perf_counter)

    def restart_rate(self) -> None:
        self.rate_step, self.rate_start = self.step, time.perf_counter()

    def steps_per_second(self) -> float:
        """Over the steps since the window began (so neither a compile at the start nor an evaluation counts),
        then begin the next window."""
        rate = (self.step - self.rate_step) / max(time.perf_counter() - self.rate_start, 1e-9)
        self.restart_rate()
        return rate

    def advance(self, bad: torch.Tensor, seconds: float) -> None:
        """Count a finished step; one whose update was skipped still counts (its batch is used up). Whether it was
        skipped stays on the device until `settle`: reading it every step would make the host wait for a GPU."""
        self.step += 1
        self.unsettled.append((self.step, bad))
        self.train_seconds += seconds

    def settle(self) -> list[tuple[int, int]]:
        """Read the skip flags of the steps since the last call; (step, skips in a row) for each skipped one."""
        skipped = []
        flags = torch.stack([bad for _, bad in self.unsettled]).tolist() if self.unsettled else []
        for (step, _), bad in zip(self.unsettled, flags, strict=True):
            self.skipped, self.bad_in_a_row = self.skipped + bad, self.bad_in_a_row + 1 if bad else 0
            if bad:
                skipped.append((step, self.bad_in_a_row))
        self.unsettled.clear()
        return skipped


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed over micro-steps, on this rank
    grad_norm: torch.Tensor
    lr: float
    bad: torch.Tensor  # a non-finite loss or gradient on some rank: the update was skipped (bool, on the device)


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a model into `run_dir`. Every check that can fail runs before anything is written."""
    config = config.resolved()
    run_dir = Path(run_dir)
    world = Distributed.setup(config.device)
    try:
        return _set_up_and_loop(config, run_dir, resume, progress, world)
    finally:
        world.teardown()


def _set_up_and_loop(
    config: TrainConfig, run_dir: Path, resume: bool, progress: bool, world: Distributed
) -> TrainResult:
    # Its own frame, so that the model (and DDP's hold on the process group) is gone before the group is torn
    # down: a gloo group destroyed under a live DDP module sometimes hung a rank at exit.
    run, state = _set_up(config, run_dir, resume, progress, world)
    return _loop(run, state, progress)


def _set_up(
    config: TrainConfig, run_dir: Path, resume: bool, progress: bool, world: Distributed
) -> tuple[Run, TrainState]:
    """Everything the loop needs, in an order where every check that can fail comes before the first write."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if world.device.type == "cpu":
        keep_freed_memory()
    check_run_dir(run_dir)
    checkpointer = Checkpointer(run_dir, config.keep_last)
    meta = checkpointer.resume_point(config, required=resume)
    tokenizer, model_config, init_model = _model_source(config, checkpointer)
    if config.context_length > model_config.context_length:
        raise UserError(f"context_length {config.context_length} exceeds the model's {model_config.context_length}")
    train_windows, val_windows = _load_data(config, tokenizer, world, progress)
    accumulation = _accumulation(config, world, len(train_windows))
    windows_per_step = accumulation * config.batch_size * world.world_size
    budget = _Budget(config, windows_per_step * config.context_length, windows_per_step, len(train_windows))
    state = TrainState()
    if meta is not None:  # where the checkpoint left off
        state = TrainState(step=meta.step, train_seconds=meta.train_seconds, skipped=meta.skipped_steps,
                           bad_in_a_row=meta.bad_steps_in_a_row, last_saved=meta.step)  # fmt: skip
    model, (precision, attention_precision), optimizer_state, planned = _build_model(
        config, model_config, init_model, checkpointer, world, train_windows, budget, accumulation
    )
    model_config = model.config  # with the width and dropout its start chose
    # a run resumed from a checkpoint made before model.Dropout's packed CPU draws continues with PyTorch's
    dropout_mask = "packed" if meta is None or meta.dropout_mask == "packed" else "bernoulli"
    for module in model.modules():
        if isinstance(module, Dropout):
            module.packed = dropout_mask == "packed"
    if config.optimizer == "muon" and config.fsdp and world.distributed:
        raise UserError("--optimizer muon orthogonalises whole matrices, which FSDP shards; use DDP (drop --fsdp)")
    loss_fn = DataParallelLoss(model, world, fsdp=config.fsdp, compile=config.compile)  # shards under FSDP
    optimizers = make_optimizers(model, config, world.device)
    if optimizer_state is not None:
        loss_fn.load_optimizer_state(optimizers, optimizer_state)
    eval_model = GPT(model_config).to(world.device) if loss_fn.fsdp and world.is_main else model
    eval_model.cpu_attention_fp32 = model.cpu_attention_fp32
    autocast = autocast_for(world.device, precision)
    evaluator = Evaluator(val_windows, tokenizer, config.batch_size, config.eval_batches, world.device, autocast)
    checkpointer.start(config, model_config, (precision, attention_precision), tokenizer, world.device, dropout_mask)
    run = Run(config, run_dir, world, tokenizer, model, eval_model, loss_fn, optimizers, train_windows, evaluator,
              checkpointer, budget, accumulation, windows_per_step, precision, attention_precision, autocast,
              planned, _Silent())  # fmt: skip
    if world.is_main:  # only now touch the run dir, and only from rank 0
        run.log = _start_run_dir(run, meta.step if meta else None)
    return run, state


def _model_source(config: TrainConfig, checkpointer: Checkpointer) -> tuple[Tokenizer, ModelConfig, GPT | None]:
    """Model shape and tokenizer: from the checkpoint being resumed, the weights to start from, or the config."""
    if checkpointer.resumed is not None:
        return checkpointer.resumed_tokenizer(), checkpointer.resumed.model_config, None
    if config.init_from is not None:
        init_model, tokenizer, _ = checkpoint.load_model(config.init_from)
        _check_init_shape(config, init_model.config)
        return tokenizer, replace(init_model.config, **config.dropouts()), init_model
    tokenizer = load_tokenizer(config.tokenizer, config.data)
    return tokenizer, config.model_config(tokenizer.vocab_size, tokenizer.eos_id), None


def _check_init_shape(config: TrainConfig, model: ModelConfig) -> None:
    """--init-from gives the model's shape: a model setting the config asks otherwise is refused, not ignored (all but
    the dropouts, which a fine-tune may change, and the context, which may be shorter than the model's)."""
    asked = {f.name: getattr(config, f.name) for f in fields(ModelConfig) if hasattr(config, f.name)}
    clashes = [f"{name} {value!r} (there: {getattr(model, name)!r})" for name, value in asked.items()
               if name not in ("dropout", "attention_dropout", "context_length") and value is not None
               and value != getattr(model, name)]  # fmt: skip
    if clashes:
        raise UserError(f"--init-from {config.init_from} gives the model's shape, but the config asks for "
                        f"{', '.join(clashes)}; leave those out, or train without --init-from")  # fmt: skip


def _load_data(
    config: TrainConfig, tokenizer: Tokenizer, world: Distributed, progress: bool
) -> tuple[TokenWindows, TokenWindows]:
    """Training windows in a seeded order, validation windows in order: a validation source, the hub's
    validation split, or else the held-out tail of local data. Rank 0 prepares (and caches) the data first."""
    show = progress and world.is_main
    with world.main_first():
        train_data = prepare(config.data, tokenizer, split="train", progress=show)
    train_data.check_tokenizer(tokenizer)
    if config.val_data is not None or is_hub_id(config.data):
        with world.main_first():
            val_data = prepare(config.val_data or config.data, tokenizer, "validation", progress=show)
        val_data.check_tokenizer(tokenizer)
        train_tokens, val_tokens = train_data.tokens(), val_data.tokens()
    else:
        train_tokens, val_tokens = train_data.holdout(config.val_fraction)
    context = config.context_length
    train_windows = TokenWindows(
        train_tokens, context, seed=config.seed, name=f"training data {config.data}", shift=config.shift_windows
    )
    return train_windows, TokenWindows(val_tokens, context, seed=None, name="validation data")


def _accumulation(config: TrainConfig, world: Distributed, num_windows: int) -> int:
    """Micro-steps per optimizer step, so that each step sees at least tokens_per_step tokens."""
    if config.batch_size * world.world_size > num_windows:
        raise UserError(
            f"batch_size {config.batch_size} exceeds the {num_windows} windows of {config.context_length + 1} "
            "tokens in the training data; use a smaller batch_size or context_length, or more data"
        )
    return math.ceil(config.tokens_per_step / (config.batch_size * config.context_length * world.world_size))


def _build_model(config: TrainConfig, model_config: ModelConfig, init_model: GPT | None, checkpointer: Checkpointer,
                 world: Distributed, train_windows: TokenWindows, budget: _Budget, accumulation: int,
                 ) -> tuple[GPT, tuple[str, str], dict | None, Planned]:  # fmt: skip
    """The model (initialised from the seed, then given the resumed or initial weights), its precision and its
    attention's (see choose_precision), the optimizer state to restore (None for a new run), and what the start
    of a new run chose by its planned passes over the data."""

    def build(model_config: ModelConfig) -> GPT:
        torch.manual_seed(config.seed)
        model = GPT(model_config).to(world.device)
        if init_model is not None:
            model.load_state_dict(init_model.state_dict())
        return model

    def planned_passes(model: GPT) -> float:
        """Passes over the data the budget allows at `model`'s measured speed (rank 0's, on every rank)."""
        seconds_per_step = None
        if budget.max_seconds is not None:
            seconds_per_row = _time_rows(model, batch, world.device, [precisions])[precisions]
            seconds_per_step = seconds_per_row * accumulation * config.batch_size
        return world.broadcast(budget.passes(seconds_per_step))

    model, planned = build(model_config), Planned()
    if checkpointer.resumed is not None:  # its model config holds the width and dropout it was given
        precisions, optimizer_state = checkpointer.resumed.precisions, checkpointer.restore(model)
    else:
        batch = train_windows.batch(0, config.batch_size)  # every rank must compute alike: rank 0's measurement
        precisions = world.broadcast(choose_precision(config.precision, world.device, model, batch))
        optimizer_state = None
        passes = None  # planned at the model's width, once timed
        narrow = config.narrowed(model_config)
        if narrow and init_model is None and budget.total_steps is None:  # a time budget alone: narrow buys tokens
            passes = planned_passes(model)
            if passes < NARROW_BELOW_PASSES:
                planned.narrowed_from = model_config.d_model, passes
                model_config, model, passes = narrow, build(narrow), None
        if config.dropout == "auto":
            planned.dropout_passes = planned_passes(model) if passes is None else passes
            # built again from the same seed: the same weights, now with dropout (attention_dropout None is
            # ModelConfig's "as dropout")
            if dropout := auto_dropout(planned.dropout_passes):
                model = build(replace(model_config, dropout=dropout, attention_dropout=config.attention_dropout))
    model.cpu_attention_fp32 = precisions[1] == "fp32"
    if checkpointer.resumed is None and _measures_attention(model.config, config):
        dtype = torch.bfloat16 if precisions == ("bf16", "bf16") else torch.float32
        shape = (config.batch_size, model.config.n_head, config.context_length, model.config.head_size)
        kernel = world.broadcast(choose_causal_kernel(shape, dtype, world.device, model.config.attention_dropout))
        if kernel == "blocked":  # recorded, so that a resumed run attends alike; "auto" is SDPA's causal kernel
            model.config = replace(model.config, attention=kernel)
    return model, precisions, optimizer_state, planned


def _measures_attention(model_config: ModelConfig, config: TrainConfig) -> bool:
    """Whether a new run times its causal attention's kernels (attention.choose_causal_kernel) before starting."""
    return model_config.attention == "auto" and not model_config.document_mask and not config.compile


def _start_run_dir(run: Run, resume_step: int | None) -> RunLog:
    """Write the tokenizer and the resolved config.json into the run dir; open its log."""
    config = run.config
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.tokenizer.save(run.run_dir)
    resolved = {"train": config.to_dict(), "model": run.model.config.to_dict(), "precision": run.precision,
                "attention_precision": run.attention_precision, "accumulation": run.accumulation,
                "tokens_per_step": run.tokens_per_step,
                "total_steps": run.budget.total_steps}  # fmt: skip
    atomic.write_json(run.run_dir / "config.json", resolved)
    return RunLog(run.run_dir, resume_step, config.to_dict() if config.wandb else None)


# -- the loop ------------------------------------------------------------------------------------
def _loop(run: Run, state: TrainState, progress: bool) -> TrainResult:
    config, world = run.config, run.world
    with _StopSignals() as stop, contextlib.closing(run.log):
        run.log.print(_describe(run, state))
        show = None if progress and world.is_main else True
        bar = tqdm(total=run.budget.total_steps, initial=state.step, unit="step", disable=show, leave=False)
        state.restart_rate()
        with contextlib.closing(bar):
            run.model.train()
            while True:
                state.train_seconds, stopping = world.agree(state.train_seconds, stop.signum is not None)
                if stopping or run.budget.done(state.step, state.train_seconds):
                    break
                started = time.perf_counter()
                lr = learning_rate(config, state.step, run.budget.progress(state.step, state.train_seconds))
                result = train_step(run, state.step, lr)
                state.advance(result.bad, time.perf_counter() - started)
                bar.update()
                evaluating, checkpointing = _due(config, state.step)
                _log_step(run, state, result, bar, settle=evaluating or checkpointing)
                _report(run, state, evaluating, checkpointing and not state.bad_in_a_row)  # keep the last good newest
            # the final model is always evaluated (unless interrupted) and saved
            if stop_error := _settle(run, state):
                raise stop_error
            _report(run, state, stop.signum is None and state.last_eval != state.step, state.step != state.last_saved)
    if stop.signum is not None and world.is_main:
        print(f"stopped by signal {stop.signum} at step {state.step}; checkpoint saved; run the same command to resume")
    return TrainResult(run.run_dir, state.step, state.step * run.tokens_per_step, state.val_loss, state.val_bpb,
                       state.sample, stop.signum, world.rank)  # fmt: skip


def _due(config: TrainConfig, step: int) -> tuple[bool, bool]:
    """Whether `step` is evaluated, and whether it is checkpointed (by default at every evaluation)."""
    evaluating = step % config.eval_every == 0
    if config.checkpoint_every:
        return evaluating, step % config.checkpoint_every == 0
    return evaluating, evaluating


def train_step(run: Run, step: int, lr: float) -> StepResult:
    """One optimizer step: `accumulation` micro-batches on each rank, clipping, and the update, skipped on every
    rank when any rank's loss or gradient is not finite."""
    config, world = run.config, run.world
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    loss_sum = torch.zeros((), device=world.device)
    for micro in range(run.accumulation):
        first = ((step * run.accumulation + micro) * world.world_size + world.rank) * config.batch_size
        inputs, targets = run.train_windows.batch(first, config.batch_size, world.device)
        with run.loss_fn.sync(last_micro_step=micro == run.accumulation - 1):
            with run.autocast:
                loss = run.loss_fn(inputs, targets)
            (loss / run.accumulation).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    # A skipped step still counts (its batch is used up), so batches stay a pure function of (seed, step) and
    # a resumed run skips exactly the same steps.
    bad = world.any_on_device(~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)))
    for optimizer in run.optimizers:
        _step_unless(optimizer, bad)
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, lr, bad)


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()` unless `skip`. Fused AdamW decides on the device, through the flag that GradScaler
    hands it (the update is skipped and its step count undone); reading the flag on the host instead stalled an
    H100 for 6-8% of a 28M step (benchmarks/gpu_step_costs.py). Others read it, as does AdamW resumed from a run
    that used it unfused (its groups keep the setting they were saved with)."""
    if isinstance(optimizer, torch.optim.AdamW) and all(group["fused"] for group in optimizer.param_groups):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        optimizer.step()
    elif not skip.item():
        optimizer.step()


def _describe(run: Run, state: TrainState) -> str:
    config, model, evaluator = run.config, run.model, run.evaluator
    verb = "resuming from step" if run.checkpointer.resumed else "training from step"
    attention = f" (attention {run.attention_precision})" if run.attention_precision != run.precision else ""
    scored, windows = evaluator.windows_scored, len(evaluator.windows)
    spread = " spread evenly (eval: all)" if scored < windows else ""
    planned, choices = run.planned, ""  # what its start chose
    if planned.narrowed_from is not None:
        width, passes = planned.narrowed_from
        choices = (f", {model.config.d_model} wide, {model.config.n_head} heads (narrow_d_model: ~{passes:.0f} "
                   f"passes planned at {width} wide, fewer than {NARROW_BELOW_PASSES})")  # fmt: skip
    if model.config.dropout or planned.dropout_passes is not None:
        choices += f", dropout {model.config.dropout:g}"
    if planned.dropout_passes is not None:
        choices += f" (auto: ~{planned.dropout_passes:.0f} passes over the data planned)"
    return (
        f"{verb} {state.step}: {config.init_from or config.preset} ({model.num_parameters():,} parameters, "
        f"{model.num_parameters(True):,} non-embedding), tokenizer {run.tokenizer.name} "
        f"({run.tokenizer.vocab_size}), {run.world.device} {run.precision}{attention}{run.loss_fn.describe()}"
        f"{choices}, "
        f"{run.tokens_per_step:,} tokens/step ({config.batch_size}x{config.context_length} x {run.accumulation} "
        f"accumulation), {len(run.train_windows):,} training windows, validation on {scored:,} of {windows:,} "
        f"windows{spread}, budget {run.budget.total_steps or '-'} steps"
        f"{f' / {config.max_time}' if config.max_time else ''} -> {run.run_dir}"
    )


def _log_step(run: Run, state: TrainState, result: StepResult, bar: tqdm, settle: bool) -> None:
    """Every log_every steps (and when `settle`, or when max_bad_steps flags wait unread: a streak must stop the
    run soon, however rarely it logs): the skipped updates since the last time, then a train record (a collective:
    every rank computes the mean loss)."""
    config, step = run.config, state.step
    logging = step % config.log_every == 0 or step == 1
    settle = settle or len(state.unsettled) >= config.max_bad_steps
    stop = _settle(run, state) if logging or settle else None
    if logging:
        loss = run.world.mean(result.loss_sum).item() / run.accumulation
        speed = state.steps_per_second() * run.tokens_per_step
        epoch = step * run.windows_per_step / len(run.train_windows)
        run.log.record({"kind": "train", "step": step, "tokens": step * run.tokens_per_step, "loss": loss,
                        "lr": result.lr, "grad_norm": result.grad_norm.item(), "skipped_steps": state.skipped,
                        "tokens_per_second": speed, "epoch": epoch, "seconds": state.train_seconds,
                        "peak_memory_mb": peak_memory_mb(run.world.device)})  # fmt: skip
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{result.lr:.2e}", tok_s=f"{speed:,.0f}")
        if bar.disable:
            run.log.print(f"step {step}: loss {loss:.4f}, lr {result.lr:.2e}, {speed:,.0f} tokens/s")
    if stop:
        raise stop


def _settle(run: Run, state: TrainState) -> UserError | None:
    """Report each skipped update since the last call; the error that stops the run if too many in a row were."""
    stop = None
    for step, in_a_row in state.settle():
        run.log.print(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row)")
        if in_a_row >= run.config.max_bad_steps and stop is None:
            kept = run.checkpointer.root / f"step-{state.last_saved:06d}" if state.last_saved >= 0 else None
            stop = UserError(
                f"training stopped at step {step}: {in_a_row} steps in a row had a non-finite loss or "
                f"gradient (max_bad_steps {run.config.max_bad_steps}); the last good checkpoint is "
                f"{kept or 'none: none was written'}; lower lr or use precision fp32 and train again "
                "(--init-from that checkpoint keeps its weights)"
            )
    return stop


def _report(run: Run, state: TrainState, evaluating: bool, checkpointing: bool) -> None:
    """Evaluate and/or checkpoint on rank 0; every rank takes part in gathering sharded state."""
    if evaluating or checkpointing:
        weights = run.loss_fn.model_state()
        optimizer_state = run.loss_fn.optimizer_state(run.optimizers) if checkpointing else None
        if run.world.is_main and evaluating:
            _evaluate(run, state, weights)
        if run.world.is_main and checkpointing:
            run.checkpointer.save(weights, optimizer_state, state.val_loss if evaluating else None,
                                  step=state.step, tokens=state.step * run.tokens_per_step,
                                  train_seconds=state.train_seconds, skipped_steps=state.skipped,
                                  bad_steps_in_a_row=state.bad_in_a_row)  # fmt: skip
        state.restart_rate()  # the time it took is not training's
    state.last_eval = state.step if evaluating else state.last_eval
    state.last_saved = state.step if checkpointing else state.last_saved


def _evaluate(run: Run, state: TrainState, weights: dict) -> None:
    """Validation figures and a sample story: recorded, printed, plotted, and kept in `state`."""
    if run.eval_model is not run.model:  # FSDP: rank 0 evaluates a gathered copy
        run.eval_model.load_state_dict(weights)
    result = run.evaluator.evaluate(run.eval_model)
    text = run.evaluator.sample(run.eval_model, run.config.sample_tokens, run.config.seed)
    run.log.record({"kind": "eval", "step": state.step, "tokens": state.step * run.tokens_per_step,
                    **result.to_record(), "seconds": state.train_seconds, "sample": text})  # fmt: skip
    run.log.print(f"step {state.step}: val loss {result.loss:.4f}, {result.bits_per_byte:.4f} bits/byte | {text!r}")
    run.log.plot()
    state.val_loss, state.val_bpb, state.sample = result.loss, result.bits_per_byte, text


class _Silent:
    """The log of ranks other than 0: they train but do not report."""

    def record(self, record: dict) -> None: ...

    def print(self, message: str) -> None: ...

    def plot(self) -> None: ...

    def close(self) -> None: ...


class _StopSignals:
    """SIGINT/SIGTERM finish the current step, checkpoint and return; a second Ctrl-C stops at once.

    `signum` is the first signal caught, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> _StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
