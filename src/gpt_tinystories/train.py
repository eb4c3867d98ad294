"""The training loop: AdamW with warmup + cosine decay, accumulation, autocast, exact resume.

`train(config, run_dir)` is the whole job: tokenizer, data, model, loop, evaluation, checkpoints. Every batch
is a pure function of (seed, step), and the weights, optimizer and RNG state are checkpointed together, so a
resumed CPU run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import ModelConfig, TrainConfig, parse_duration
from .data import TokenWindows, is_hub_id, is_prepared, iter_stories, prepare
from .distributed import DataParallelLoss, Distributed
from .errors import UserError
from .evaluate import evaluate, gpt2_tokens_scored
from .generate import Sampling, generate
from .metrics import LOG, METRICS, PLOT, RunLog, write_text_atomic
from .model import GPT
from .runtime import autocast_for, keep_freed_memory, peak_memory_mb
from .tokenizer import TOKENIZER_FILE, Tokenizer

SAMPLE_PROMPT = "One day, a little girl named Lily found a needle in her room."
BPE_TRAINING_CHARS = 200_000_000  # a 4096-token BPE needs far less text than the whole dataset


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    val_bpb: float | None
    sample: str | None  # the model's continuation of SAMPLE_PROMPT at the last evaluation
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


def choose_precision(requested: str, device: torch.device, model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> str:
    """bf16 autocast where it is faster: always on CUDA with bf16, measured on CPUs (it depends on AVX-512 BF16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    inputs, targets = (t[:4].to(device) for t in batch)
    timings = {}
    with torch.random.fork_rng(devices=[]):  # dropout draws here must not shift the run's RNG stream
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # the first of each is a warm-up
            started = time.perf_counter()
            with autocast_for(device, precision):
                loss = model.loss(inputs, targets)
            loss.backward()
            timings[precision] = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"


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

    def progress(self, step: int, seconds: float) -> float:
        """Fraction of the decay phase done: by steps, or by wall time for a time-only budget."""
        parts = [seconds / self.max_seconds] if self.max_seconds else []
        if self.total_steps is not None:
            parts.append((step - self.warmup) / max(self.total_steps - self.warmup, 1))
        return max(parts)

    def done(self, step: int, seconds: float) -> bool:
        return (self.total_steps is not None and step >= self.total_steps) or (
            self.max_seconds is not None and seconds >= self.max_seconds
        )


def check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses a run dir that holds a run of other settings."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; choose a folder for the run")
    _refuse_escapes(run_dir)
    latest = checkpoint.latest(run_dir)
    if latest is None:
        if resume:
            raise UserError(f"--resume: {run_dir} holds no checkpoint; drop --resume to start a new run there")
        return None
    saved = TrainConfig.from_dict(checkpoint.load_meta(latest)["train_config"], source=str(latest))
    changed = [
        f.name
        for f in fields(TrainConfig)
        if getattr(saved, f.name) != getattr(config, f.name) and f.name not in TrainConfig.RESUMABLE_CHANGES
    ]
    if changed:
        diff = ", ".join(f"{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in changed)
        raise UserError(
            f"{run_dir} holds a checkpoint of a different config ({diff}); pass another --out for a "
            "new run, or the same settings to resume this one"
        )
    return latest


RUN_DIR_OUTPUTS = ("config.json", TOKENIZER_FILE, METRICS, LOG, PLOT, "wandb-id.txt", "wandb", checkpoint.CHECKPOINTS)


def _refuse_escapes(run_dir: Path) -> None:
    """A symlink among the run dir's outputs would make training write (and prune) outside it: refuse it."""
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


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a model into `run_dir`. Every check that can fail runs before anything is written."""
    config = config.resolved()
    run_dir = Path(run_dir)
    world = Distributed.setup(config.device)
    try:
        return _train(config, run_dir, resume, progress, world)
    finally:
        world.teardown()


def _train(config: TrainConfig, run_dir: Path, resume: bool, progress: bool, world: Distributed) -> TrainResult:
    device = world.device
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        keep_freed_memory()
    resume_from = check_run_dir(run_dir, config, resume)
    meta = checkpoint.load_meta(resume_from) if resume_from else None

    # Model shape and tokenizer: from the checkpoint being resumed, the weights to start from, or the config.
    init_model = None
    if meta is not None:
        tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
        if tokenizer.hash != meta["tokenizer"]["hash"]:
            raise UserError(f"{run_dir / TOKENIZER_FILE} is not the tokenizer of checkpoint {resume_from}; restore it")
        model_config = ModelConfig.from_dict(meta["model_config"])
    elif config.init_from is not None:
        init_model, tokenizer, _ = checkpoint.load_model(config.init_from)
        model_config = replace(init_model.config, dropout=config.dropout)
    else:
        tokenizer = load_tokenizer(config.tokenizer, config.data)
        model_config = config.model_config(tokenizer.vocab_size, tokenizer.eos_id)
    if config.context_length > model_config.context_length:
        raise UserError(f"context_length {config.context_length} exceeds the model's {model_config.context_length}")
    with world.main_first():  # rank 0 prepares (and caches) the data; the others then find it
        train_data = prepare(config.data, tokenizer, split="train", progress=progress and world.is_main)
    train_data.check_tokenizer(tokenizer)
    if config.val_data is not None or is_hub_id(config.data):  # a validation source, or the hub's split
        with world.main_first():
            val_data = prepare(
                config.val_data or config.data, tokenizer, "validation", progress=progress and world.is_main
            )
        val_data.check_tokenizer(tokenizer)
        train_tokens, val_tokens = train_data.tokens(), val_data.tokens()
    else:  # hold out the tail of local data
        train_tokens, val_tokens = train_data.holdout(config.val_fraction)
    context = config.context_length
    train_windows = TokenWindows(train_tokens, context, seed=config.seed, name=f"training data {config.data}")
    val_windows = TokenWindows(val_tokens, context, seed=None, name="validation data")
    world_size, rank = world.world_size, world.rank
    if config.batch_size * world_size > len(train_windows):
        raise UserError(
            f"batch_size {config.batch_size} exceeds the {len(train_windows)} windows of {context + 1} "
            "tokens in the training data; use a smaller batch_size or context_length, or more data"
        )
    accumulation = math.ceil(config.tokens_per_step / (config.batch_size * context * world_size))
    windows_per_step = accumulation * config.batch_size * world_size
    tokens_per_step = windows_per_step * context
    budget = _Budget(config, tokens_per_step, windows_per_step, len(train_windows))

    # Model, optimizer, state.
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    step, train_seconds, best_val, state = 0, 0.0, math.inf, None
    skipped = bad_in_a_row = 0  # steps skipped for a non-finite loss or gradient: in all, and the current streak
    if meta is not None:
        checkpoint.load_weights(resume_from, model)
        state = checkpoint.load_trainer_state(resume_from)
        torch.set_rng_state(state["rng"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        step, train_seconds = meta["step"], meta["train_seconds"]
        skipped, bad_in_a_row = meta.get("skipped_steps", 0), meta.get("bad_steps_in_a_row", 0)
        best_val = meta["best_val_loss"] if meta["best_val_loss"] is not None else math.inf
        precision = meta["precision"]
    else:
        measured = choose_precision(config.precision, device, model, train_windows.batch(0, config.batch_size))
        precision = world.broadcast(measured)  # every rank must compute alike
    autocast = autocast_for(device, precision)
    if config.optimizer == "muon" and config.fsdp and world.distributed:
        raise UserError("--optimizer muon orthogonalises whole matrices, which FSDP shards; use DDP (drop --fsdp)")
    loss_fn = DataParallelLoss(model, world, fsdp=config.fsdp, compile=config.compile)  # shards under FSDP
    optimizers = make_optimizers(model, config, device)
    if state is not None:
        loss_fn.load_optimizer_state(optimizers, state["optimizer"])
    eval_model = GPT(model_config).to(device) if loss_fn.fsdp and world.is_main else model

    # Only now touch the run dir, and only from rank 0.
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run_dir)
        resolved = {
            "train": config.to_dict(),
            "model": model_config.to_dict(),
            "precision": precision,
            "accumulation": accumulation,
            "tokens_per_step": tokens_per_step,
            "total_steps": budget.total_steps,
        }
        write_text_atomic(run_dir / "config.json", json.dumps(resolved, indent=2))
        log = RunLog(run_dir, meta["step"] if meta else None, config.to_dict() if config.wandb else None)
    else:
        log = _Silent()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    prompt = [tokenizer.eos_id, *tokenizer.encode(SAMPLE_PROMPT)]  # stories follow EOS in the data
    tokenizer_json = tokenizer.backend.to_str()

    def save(val_loss: float | None, weights: dict, optimizer_state: dict) -> None:
        nonlocal best_val
        best = min(best_val, val_loss if val_loss is not None else math.inf)
        ckpt_meta = {
            "step": step,
            "tokens": step * tokens_per_step,
            "train_seconds": train_seconds,
            "skipped_steps": skipped,
            "bad_steps_in_a_row": bad_in_a_row,
            "val_loss": val_loss,
            "best_val_loss": best if math.isfinite(best) else None,
            "precision": precision,
            "model_config": model_config.to_dict(),
            "train_config": config.to_dict(),
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "file": TOKENIZER_FILE},
        }
        trainer_state = {"optimizer": optimizer_state, "rng": torch.get_rng_state()}
        if device.type == "cuda":
            trainer_state["cuda"] = torch.cuda.get_rng_state_all()
        files = {TOKENIZER_FILE: tokenizer_json}  # each checkpoint folder is self-contained
        root = run_dir / checkpoint.CHECKPOINTS
        checkpoint.save(root / f"step-{step:06d}", weights, ckpt_meta, trainer_state, files)
        checkpoint.prune(run_dir, config.keep_last)
        if val_loss is not None and val_loss < best_val:
            best_val = val_loss
            checkpoint.save(root / "best", weights, {**ckpt_meta, "best_val_loss": val_loss}, None, files)

    val_gpt2_tokens: list[int] = []

    def evaluate_and_sample(weights: dict) -> tuple[float, float, str]:
        if eval_model is not model:  # FSDP: rank 0 evaluates a gathered copy
            eval_model.load_state_dict(weights)
        result = evaluate(eval_model, val_windows, token_bytes, config.batch_size, config.eval_batches, autocast)
        if not val_gpt2_tokens:  # the same windows every time: count their text's GPT-2 tokens once
            val_gpt2_tokens.append(gpt2_tokens_scored(result, val_windows, tokenizer))
        result.gpt2_tokens = val_gpt2_tokens[0]
        generator = torch.Generator(device).manual_seed(config.seed)  # sampling leaves the run's RNG alone
        with autocast:
            (story,) = generate(eval_model, [prompt], config.sample_tokens, Sampling(0.8, top_k=50), tokenizer.eos_id,
                                generator)  # fmt: skip
        text = tokenizer.decode(prompt[1:] + story)
        log.record(
            {
                "kind": "eval",
                "step": step,
                "tokens": step * tokens_per_step,
                "val_loss": result.loss,
                "val_bpb": result.bits_per_byte,
                "val_nats_per_gpt2_token": result.nats_per_gpt2_token,
                "seconds": train_seconds,
                "sample": text,
            }
        )
        log.print(f"step {step}: val loss {result.loss:.4f}, {result.bits_per_byte:.4f} bits/byte | {text!r}")
        log.plot()
        return result.loss, result.bits_per_byte, text

    def report(evaluating: bool, checkpointing: bool, *last: object) -> tuple:
        """Evaluate and/or checkpoint on rank 0; every rank takes part in gathering sharded state."""
        if not (evaluating or checkpointing):
            return last
        weights = loss_fn.model_state()
        optimizer_state = loss_fn.optimizer_state(optimizers) if checkpointing else None
        if not world.is_main:
            return last
        results = evaluate_and_sample(weights) if evaluating else last
        if checkpointing:
            save(results[0] if evaluating else None, weights, optimizer_state)
        return results

    stop_signal: list[int] = []
    previous_handlers = _catch_signals(stop_signal)
    verb = "resuming from step" if meta else "training from step"
    log.print(
        f"{verb} {step}: {config.init_from or config.preset} ({model.num_parameters():,} parameters, "
        f"{model.num_parameters(True):,} non-embedding), tokenizer {tokenizer.name} ({tokenizer.vocab_size}), "
        f"{device} {precision}{loss_fn.describe()}, "
        f"{tokens_per_step:,} tokens/step ({config.batch_size}x{context} x {accumulation} accumulation), "
        f"{len(train_windows):,} training windows, budget {budget.total_steps or '-'} steps"
        f"{f' / {config.max_time}' if config.max_time else ''} -> {run_dir}"
    )
    show = None if progress and world.is_main else True
    bar = tqdm(total=budget.total_steps, initial=step, unit="step", disable=show, leave=False)
    val_loss = val_bpb = story = None
    last_saved, last_eval = (step if meta else -1), -1
    session_start, session_step = time.perf_counter(), step
    try:
        model.train()
        while not world.any(budget.done(step, train_seconds) or bool(stop_signal)):
            step_start = time.perf_counter()
            lr = learning_rate(config, step, budget.progress(step, train_seconds))
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accumulation):
                first = ((step * accumulation + micro) * world_size + rank) * config.batch_size
                inputs, targets = train_windows.batch(first, config.batch_size, device)
                with loss_fn.sync(last_micro_step=micro == accumulation - 1):
                    with autocast:
                        loss = loss_fn(inputs, targets)
                    (loss / accumulation).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            # A non-finite loss or gradient on any rank skips the update on all of them. The step still counts
            # (its batch is used up), so batches stay a pure function of (seed, step) and a resumed run skips
            # exactly the same steps.
            bad = world.any(not (math.isfinite(loss_sum.item()) and math.isfinite(grad_norm.item())))
            for optimizer in optimizers:
                if not bad:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            skipped, bad_in_a_row = skipped + bad, bad_in_a_row + 1 if bad else 0
            train_seconds += time.perf_counter() - step_start
            bar.update()
            if bad:
                log.print(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
            if step % config.log_every == 0 or step == 1:
                loss_value = world.mean(loss_sum).item() / accumulation
                speed = (step - session_step) * tokens_per_step / (time.perf_counter() - session_start)
                log.record(
                    {
                        "kind": "train",
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "skipped_steps": skipped,
                        "tokens_per_second": speed,
                        "epoch": step * windows_per_step / len(train_windows),
                        "seconds": train_seconds,
                        "peak_memory_mb": peak_memory_mb(device),
                    }
                )
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
                if bar.disable:
                    log.print(f"step {step}: loss {loss_value:.4f}, lr {lr:.2e}, {speed:,.0f} tokens/s")
            if bad_in_a_row >= config.max_bad_steps:
                kept = run_dir / checkpoint.CHECKPOINTS / f"step-{last_saved:06d}" if last_saved >= 0 else None
                raise UserError(
                    f"training stopped at step {step}: {bad_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (max_bad_steps {config.max_bad_steps}); the last good checkpoint is "
                    f"{kept or 'none: none was written'}; lower lr or use precision fp32 and train again "
                    "(--init-from that checkpoint keeps its weights)"
                )
            evaluating = step % config.eval_every == 0
            checkpointing = (config.checkpoint_every and step % config.checkpoint_every == 0) or (
                evaluating and not config.checkpoint_every
            )
            checkpointing = checkpointing and not bad_in_a_row  # keep the last good checkpoint the newest
            val_loss, val_bpb, story = report(evaluating, checkpointing, val_loss, val_bpb, story)
            last_eval, last_saved = (step if evaluating else last_eval), (step if checkpointing else last_saved)
        # the final model is always evaluated (unless interrupted) and saved
        evaluating, checkpointing = not stop_signal and last_eval != step, step != last_saved
        val_loss, val_bpb, story = report(evaluating, checkpointing, val_loss, val_bpb, story)
    finally:
        bar.close()
        _restore_signals(previous_handlers)
        log.close()
    if stop_signal and world.is_main:
        print(f"stopped by signal {stop_signal[0]} at step {step}; checkpoint saved; run the same command to resume")
    signum = stop_signal[0] if stop_signal else None
    return TrainResult(run_dir, step, step * tokens_per_step, val_loss, val_bpb, story, signum, world.rank)


class _Silent:
    """The log of ranks other than 0: they train but do not report."""

    def record(self, record: dict) -> None: ...

    def print(self, message: str) -> None: ...

    def plot(self) -> None: ...

    def close(self) -> None: ...


def _catch_signals(stop: list[int]) -> dict:
    """SIGINT/SIGTERM finish the current step, checkpoint and return; a second Ctrl-C stops at once."""

    def handler(signum: int, _frame: object) -> None:
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    return previous


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
