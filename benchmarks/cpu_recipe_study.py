"""The 10-minute CPU recipe study: which settings give the best model for 10 minutes of a 2-core CPU?

Each arm is the base recipe plus the lines that differ. A 10-minute CPU run of an arm sees
`10 min x (the arm's CPU tokens/s)` tokens, so the study runs in two phases:

    # 1. on the CPU the recipe is for: each arm's training speed relative to the base arm, timed alternately
    python benchmarks/cpu_recipe_study.py speeds --out speeds.json
    # 2. on a GPU box (one command, < 4 min on an H100): every arm x 2 seeds for its 10-minute token budget,
    #    many runs in parallel processes, then the report
    python benchmarks/cpu_recipe_study.py run RESULTS_DIR --speeds speeds.json

Phase 2 trains on `train-head.txt` less its last 10% of stories, and scores each final model on that held-out
10% (bits per byte over all its windows); `validation-first1000.txt` is kept for the chosen recipe's final
figure only. Runs use fp32, as a CPU without native bf16 does. Tokenizers (bpe-2048/4096/8192) are trained
once, on the training part, before any run starts. RESULTS_DIR gets `report.md` (arms ranked by the mean of
their seeds, with each seed's figure and the spread) and `results.json`; the run dirs go to `--work`, each
run's stderr beside its dir. No run starts or goes on past `--time-limit` seconds (default 215): arms' first
seeds run before any second seed. Runs that finished in `--work` before are read, not run again: a cut study
goes on where it stopped, more seeds or arms join the same report, and `--time-limit 0` reports what is there.

Budgets: phase 1 times each arm alternately with the base arm (the quick start) and records its speed as a
ratio to base's, which a shared machine's drifting load leaves alone better than absolute figures. Phase 2
gives each arm `600 s x ratio x --anchor` tokens, the anchor being base's tokens/s on the target CPU (default
4,700: the quick start on a quiet 2-core AMD Zen 3 without bf16, issue 14); `--anchor 0` uses base's measured
speed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_description  # noqa: E402

SAMPLE = Path(os.environ.get("TINYSTORIES_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared/data/tinystories"))
BUDGET_SECONDS = 600

# The quick start (configs/quickstart.toml) without its time limit.
BASE = {"preset": "1M", "tokenizer": "bpe-4096", "context_length": 256, "batch_size": 16, "tokens_per_step": 8192,
        "lr": 3e-3, "warmup_steps": 100}  # fmt: skip
# One change per arm (levers of issue 14), then combinations of the changes that earlier studies favoured.
# The changes earlier studies favoured, together; and round 1's winning shape, which round 2 builds on.
COMBO = {"position": "rope", "optimizer": "muon", "qk_norm": True, "n_head": 4, "schedule": "wsd",
         "decay_fraction": 0.3, "warmup_steps": 30}  # fmt: skip
WIDE_SHALLOW = {"d_model": 128, "n_layer": 4, "n_head": 4}
RECIPE = {**WIDE_SHALLOW, "tokens_per_step": 4096, "warmup_steps": 200}  # round 2's winner, which round 3 builds on
# Round 3's winner, which round 4 builds on.
R3 = {**RECIPE, "d_model": 192, "n_head": 6, "schedule": "wsd", "decay_fraction": 0.3, "weight_decay": 0.3}
R4 = {**R3, "weight_decay": 0.6}  # round 4's winner, which round 5 builds on
R5 = {**R4, "lr": 5e-3}  # round 5's winner, which round 6 builds on
R6 = {**R5, "d_model": 160, "n_head": 5, "lr": 7e-3, "warmup_steps": 100}  # round 6's winner, which round 7 builds on
R7 = {**R6, "d_model": 128, "n_head": 4}  # round 7's winner, which round 8 builds on
R8 = {**R7, "min_lr_ratio": 0.0}  # round 8's winner, which round 9 builds on
R9 = {**R8, "position": "rope"}  # round 9's winner, which round 10 builds on
R10 = {**R9, "shift_windows": True}  # round 10's winner, which round 11 builds on
ARMS: dict[str, dict] = {
    "base": {},
    "rope": {"position": "rope"},
    "muon": {"optimizer": "muon"},
    "qk-norm": {"qk_norm": True},
    "wsd": {"schedule": "wsd", "decay_fraction": 0.3},
    "doc-mask": {"document_mask": True},
    "vocab-2048": {"tokenizer": "bpe-2048"},
    "vocab-8192": {"tokenizer": "bpe-8192"},
    "heads-4x16": {"n_head": 4},  # same width, heads of 16: attention costs heads x T^2 on a CPU
    "wide-shallow": WIDE_SHALLOW,
    "narrow-deep": {"d_model": 64, "n_layer": 12, "n_head": 4},
    "ctx-128": {"context_length": 128, "batch_size": 32},
    "ctx-512-doc": {"context_length": 512, "batch_size": 8, "document_mask": True},
    "batch-16k": {"tokens_per_step": 16384},
    "batch-4k": {"tokens_per_step": 4096, "warmup_steps": 200},
    "lr-6e-3": {"lr": 6e-3},
    "warmup-30": {"warmup_steps": 30},
    "combo": COMBO,
    "combo-doc": {**COMBO, "document_mask": True},
    # Round 2, around round 1's clear winner (wide-shallow, -15% bits/byte): its shape with the other
    # changes that helped on their own, one at a time, then together.
    "ws-lr-6e-3": {**WIDE_SHALLOW, "lr": 6e-3},
    "ws-batch-4k": RECIPE,
    "ws-ctx-512-doc": {**WIDE_SHALLOW, "context_length": 512, "batch_size": 8, "document_mask": True},
    "ws-wsd": {**WIDE_SHALLOW, "schedule": "wsd", "decay_fraction": 0.3},
    "ws-vocab-8192": {**WIDE_SHALLOW, "tokenizer": "bpe-8192"},
    "ws-muon": {**WIDE_SHALLOW, "optimizer": "muon"},
    "ws-3-layers": {"d_model": 128, "n_layer": 3, "n_head": 4},
    "w192-3-layers": {"d_model": 192, "n_layer": 3, "n_head": 6},
    "ws-all": {
        **WIDE_SHALLOW,
        "lr": 6e-3,
        "tokens_per_step": 4096,
        "warmup_steps": 200,
        "schedule": "wsd",
        "decay_fraction": 0.3,
        "tokenizer": "bpe-8192",
    },  # fmt: skip
    # Round 3, on the CPU the recipe is for and at the budget a real 10-minute run of round 2's winner reaches
    # there (5.75M tokens, ~11 passes over the sample: half again the study's estimate): more capacity,
    # regularisation for the repeated data, and the schedule, optimizer and step-size levers again.
    "rec-dropout": {**RECIPE, "dropout": 0.1},
    "rec-wd-0.3": {**RECIPE, "weight_decay": 0.3},
    "rec-w192": {**RECIPE, "d_model": 192, "n_head": 6},
    "rec-6-layers": {**RECIPE, "n_layer": 6},
    "rec-wsd": {**RECIPE, "schedule": "wsd", "decay_fraction": 0.3},
    "rec-batch-2k": {**RECIPE, "tokens_per_step": 2048, "batch_size": 8, "warmup_steps": 400},
    "rec-muon": {**RECIPE, "optimizer": "muon"},
    "rec-w256": {**RECIPE, "d_model": 256, "n_head": 8},
    "w192-wsd": {**RECIPE, "d_model": 192, "n_head": 6, "schedule": "wsd", "decay_fraction": 0.3},
    # Round 3's winner: the three changes that helped, together.
    "w192-wsd-wd": R3,
    # Round 4, around round 3's winner at the tokens its real 10-minute run reached (4.5M, ~9 passes over the
    # sample): stronger weight decay, which leaves a step's cost alone. 0.6 went into configs/cpu-10min.toml.
    "r4-recipe": R3,  # round 3's winner again, at round 4's budget (a run of its own)
    "r4-wd-0.6": R4,
    "r4-wd-1.0": {**R3, "weight_decay": 1.0},
    # Round 5, around round 4's winner at the tokens its real runs reach on CPUs without bf16 (~4.0M): regularisation
    # of another kind for the repeated sample (dropout), and the two schedule arms round 4 cut short. lr 5e-3 is
    # configs/cpu-10min.toml.
    "r5-recipe": R4,
    "r5-dropout-0.1": {**R4, "dropout": 0.1},
    "r5-lr-5e-3": R5,
    "r5-decay-0.5": {**R4, "decay_fraction": 0.5},
    # Round 6, around round 5's winner at the tokens of the slowest real run without bf16 (3.56M, 869 steps, where
    # it missed the goal): levers for a short run (a shorter warm-up, a higher rate), a narrower and so faster
    # shape, and the three together, which went into configs/cpu-10min.toml.
    "r6-recipe": R5,
    "r6-warmup-100": {**R5, "warmup_steps": 100},
    "r6-lr-7e-3": {**R5, "lr": 7e-3},
    "r6-w160": {**R5, "d_model": 160, "n_head": 5},
    "r6-w160-lr-7e-3-warmup-100": R6,
    # Round 7, around round 6's winner (r6-w160-lr-7e-3-warmup-100, whose runs it reuses) at the same budget: the
    # rate again, and narrower shapes (128 wide went into configs/cpu-10min.toml).
    "r7-lr-1e-2": {**R6, "lr": 1e-2},
    "r7-w128": R7,
    "r7-w96": {**R6, "d_model": 96, "n_head": 3},
    # Round 8, around round 7's winner (r7-w128, whose runs it reuses) at the same budget: ~14 passes over the
    # sample leave the training loss ~0.7 nats under the held-out one, so regularisation again, as dropout that
    # keeps PyTorch's fused CPU attention kernel (none on the attention weights; round 5's dropout had it there),
    # at two rates, and with round 6's wider shape, which more regularisation might let pay off; and the decay down
    # to 0 (which went into configs/cpu-10min.toml).
    "r8-dropout-0.1": {**R7, "dropout": 0.1, "attention_dropout": 0.0},
    "r8-dropout-0.2": {**R7, "dropout": 0.2, "attention_dropout": 0.0},
    "r8-w160-dropout-0.1": {**R6, "dropout": 0.1, "attention_dropout": 0.0},
    "r8-min-lr-0": R8,
    # Round 9, around round 8's winner (r8-min-lr-0, whose runs it reuses) at the same budget: rotary positions,
    # which gain at equal tokens (docs/study-1m.md) but lost at the quick start's 16 heads of 4 for their CPU
    # time (round 1), and may cost less at 4 heads of 32; and a longer decay, now that it goes down to 0.
    "r9-rope": R9,
    "r9-decay-0.5": {**R8, "decay_fraction": 0.5},
    # Round 10, around round 9's winner (r9-rope) at the same budget: ~14 passes over the sample, and a real
    # 10-minute bf16 run's ~31 ended with its training loss at ~0.56 of the held-out one, so each pass cuts its
    # windows at a new offset (no cost in speed).
    "r10-shift-windows": R10,
    # Round 11, around round 10's winner (r10-shift-windows, whose runs it reuses) at the same budget: levers
    # left untried at this shape that the exports can still carry (transformers' Llama: RMSNorm + SwiGLU; GPT-NeoX
    # with an untied LM head), two heads of 64 (fewer, larger attention calls), and the learning rate and weight
    # decay again now that rotary positions and new offsets each pass changed what is learnt per step.
    "r11-llama": {**R10, "norm": "rmsnorm", "activation": "swiglu"},
    "r11-heads-2x64": {**R10, "n_head": 2},
    "r11-untied": {**R10, "tied_embeddings": False},
    "r11-lr-1e-2": {**R10, "lr": 1e-2},
    "r11-wd-1.0": {**R10, "weight_decay": 1.0},
    # and dropout that keeps the fused CPU attention kernel, which lost at round 7's recipe (round 8) but gained
    # 0.036 in a real 10-minute bf16 run of round 10's, whose ~30 passes memorise the sample
    "r11-dropout-0.1": {**R10, "dropout": 0.1, "attention_dropout": 0.0},
    # Round 13, at a Zen 3's budget (~1,000 steps of round 10's recipe, round 12's runs reused): levers that trade
    # tokens for steps or capacity, which earlier rounds judged at 1.5-8x more steps: 96 wide (level with 128 at
    # round 7's budget, faster per token) and 2,048 tokens per step (twice the updates; level at round 2's).
    "r13-w96": {**R10, "d_model": 96, "n_head": 3},
    "r13-batch-2k": {**R10, "batch_size": 8, "tokens_per_step": 2048, "warmup_steps": 200},
    # Round 14, around round 13's winner (r13-w96, whose runs it reuses) at a Zen 3's budget: a fifth layer (the
    # capacity 96 wide gave up, for some of its speed), and Adam's second moment averaged over more steps (beta2
    # 0.99), which small batches favour (nanoGPT's small configs take it): 4,096 tokens per step is 16 windows;
    # and weight decay either side of 0.6, for a model this narrow.
    "r14-w96-l5": {**R10, "d_model": 96, "n_head": 3, "n_layer": 5},
    "r14-w96-beta2-0.99": {**R10, "d_model": 96, "n_head": 3, "beta2": 0.99},
    "r14-w96-wd-1.0": {**R10, "d_model": 96, "n_head": 3, "weight_decay": 1.0},
    "r14-w96-wd-0.3": {**R10, "d_model": 96, "n_head": 3, "weight_decay": 0.3},
    # Round 15, the other way from round 14's fifth layer (which lost 0.023 for 15% fewer tokens), at the same
    # budget: fewer parameters for more tokens, narrower still (64 wide, 2 heads of 32) or shallower (3 layers).
    "r15-w64": {**R10, "d_model": 64, "n_head": 2},
    "r15-w96-l3": {**R10, "d_model": 96, "n_head": 3, "n_layer": 3},
    # Round 16, around round 13's winner (r13-w96, run again on the CPU of this round as its reference) at the same
    # budget: the schedule for a run this short (a longer decay, a shorter warm-up), and two levers that make a
    # token cheaper at this width, where the LM head and attention weigh most: a 2,048-token vocabulary (half the
    # LM head and embedding) and context 128 (half the attention per token; 32 windows per step).
    "r16-w96-decay-0.5": {**R10, "d_model": 96, "n_head": 3, "decay_fraction": 0.5},
    "r16-w96-warmup-50": {**R10, "d_model": 96, "n_head": 3, "warmup_steps": 50},
    "r16-w96-vocab-2048": {**R10, "d_model": 96, "n_head": 3, "tokenizer": "bpe-2048"},
    "r16-w96-ctx-128": {**R10, "d_model": 96, "n_head": 3, "context_length": 128, "batch_size": 32},
}


def arm_config(name: str) -> dict:
    return {**BASE, **ARMS[name]}


def split_train_head(out: Path, held_out: float = 0.1) -> tuple[Path, Path]:
    """train-head.txt less its last `held_out` share of stories, and those stories: tuning never sees validation."""
    stories = [s.strip() for s in (SAMPLE / "train-head.txt").read_text().split("<|endoftext|>") if s.strip()]
    cut = int(len(stories) * (1 - held_out))
    paths = out / "train-part.txt", out / "held-out.txt"
    for path, part in zip(paths, (stories[:cut], stories[cut:]), strict=True):
        path.write_text("\n<|endoftext|>\n".join(part) + "\n")
    return paths


# -- phase 1: CPU speeds -------------------------------------------------------------------------
def measure_speeds(args: argparse.Namespace) -> None:
    """Each arm's training step time against the base arm's, timed alternately (a shared machine's load drifts
    by more than the arms differ): fp32, forward + backward of each micro-batch and one optimizer update per
    step, as train() does it. Token values do not change the speed, so the batches are random tokens of the
    arm's vocabulary with an end of story every 100-300 tokens (TinyStories' stories); no tokenizer is trained.
    An arm that differs from a timed one only in the learning-rate schedule, weight decay or Adam's betas runs at
    its speed and is not timed. With --against ARM a later round's arms are timed beside ARM instead of base and
    added to --out, which holds ARM's ratio to base already."""
    import torch

    reference, names = args.against or "base", args.arms or list(ARMS)
    timing = {"cpu": cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__,
              "load_before": os.getloadavg()[0]}  # fmt: skip
    if args.against:  # a later round: its arms beside a recent winner whose speed --out already holds
        results = json.loads(Path(args.out).read_text())
        scale = results["arms"][reference]["ratio_to_base"]
    else:  # the file is this timing and its arms
        results, scale = timing, 1.0
        results["arms"] = {}
    ref, ref_times = _Stepper(reference), []
    for name in names:
        timed = [
            reference,
            *(arm for arm, value in results["arms"].items() if arm in ARMS and "same_speed_as" not in value),
        ]
        twin = next((arm for arm in timed if arm != name and _same_cost(name, arm)), None)
        if twin is not None:
            ratio = 1.0 if twin == "base" else results["arms"][twin]["ratio_to_base"]
            results["arms"][name] = {"same_speed_as": twin, "ratio_to_base": ratio}
            continue
        arm = _Stepper(name)
        pairs = [(ref.time(), arm.time()) for _ in range(args.warmup + args.steps)][args.warmup :]
        # tokens/s of the arm over that of the reference in the same moment; > 1: the arm trains faster
        ratio = statistics.median(arm.tokens / a / (ref.tokens / b) for b, a in pairs)
        ref_times += [b for b, _ in pairs]
        results["arms"][name] = {"ratio_to_base": scale * ratio}
        if args.against:
            results["arms"][name][f"ratio_to_{reference}"] = ratio
        print(f"{name:<14} {ratio:5.2f}x {reference}", flush=True)
    # base's tokens/s, from the reference's median over the whole measurement
    base_speed = ref.tokens / statistics.median(ref_times) / scale if ref_times else None
    if args.against and ref_times:  # arms all same-cost twins leave an earlier timing's record alone
        results[f"timed_against_{reference}"] = timing
    for name in names:
        value = results["arms"][name]
        if base_speed:
            value["tokens_per_second"] = value["ratio_to_base"] * base_speed
        else:  # nothing timed now, so every arm is a twin of one timed before
            value["tokens_per_second"] = results["arms"].get(value["same_speed_as"], {}).get("tokens_per_second")
    timing["load_after"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{timing['cpu']}, load average {timing['load_before']:.1f} -> {timing['load_after']:.1f} "
          f"on {timing['cores']} cores -> {args.out}")  # fmt: skip


COST_FREE = {"lr", "schedule", "decay_fraction", "warmup_steps", "weight_decay", "min_lr_ratio", "beta1", "beta2"}


def _same_cost(arm: str, other: str) -> bool:
    """Whether two arms differ only in settings that leave a step's cost alone (their speeds are one)."""
    a, b = arm_config(arm), arm_config(other)
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)} <= COST_FREE


class _Stepper:
    """One arm's model and optimizers on a fixed batch: `time()` runs a training step and returns its seconds."""

    def __init__(self, name: str) -> None:
        import torch

        from gpt_tinystories.config import TrainConfig
        from gpt_tinystories.model import GPT
        from gpt_tinystories.trainer import make_optimizers

        self.config = TrainConfig.from_dict({**arm_config(name), "tokenizer": "gpt2"}).resolved()
        vocab = int(arm_config(name)["tokenizer"].removeprefix("bpe-"))
        torch.manual_seed(0)
        self.model = GPT(self.config.model_config(vocab, eos_id=0))
        self.optimizers = make_optimizers(self.model, self.config, torch.device("cpu"))
        # A quarter of a micro-batch (at least 4 rows) stands for the whole: the cost is linear in the rows.
        self.rows = min(self.config.batch_size, max(4, self.config.batch_size // 4))
        self.idx = synthetic_stories(self.rows, self.config.context_length + 1, vocab)
        self.accumulation = -(-self.config.tokens_per_step // (self.config.batch_size * self.config.context_length))
        self.tokens = self.accumulation * self.config.batch_size * self.config.context_length  # per step

    def time(self) -> float:
        """Seconds of one whole training step, estimated from a part of a micro-batch and one update."""
        started = time.perf_counter()
        self.model.loss(self.idx[:, :-1], self.idx[:, 1:]).backward()
        between = time.perf_counter()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro = (between - started) * self.config.batch_size / self.rows
        return self.accumulation * micro + time.perf_counter() - between


def synthetic_stories(batch: int, length: int, vocab: int, eos: int = 0):  # noqa: ANN201 (a torch tensor)
    import torch

    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(1, vocab, (batch, length), generator=generator)
    for row in idx:
        position = int(torch.randint(0, 200, (1,), generator=generator))
        while position < length:
            row[position] = eos
            position += int(torch.randint(100, 300, (1,), generator=generator))
    return idx


def _tokenizer(spec: str, train_part: Path, folder: str | Path) -> str:
    """A tokenizer.json trained once on the training part (bpe-N), so that runs share it."""
    from gpt_tinystories.data import iter_stories
    from gpt_tinystories.tokenizer import Tokenizer

    target = Path(folder) / "tokenizers" / spec
    if not (target / "tokenizer.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(iter_stories(str(train_part)), int(spec.removeprefix("bpe-"))).save(target)
    return str(target / "tokenizer.json")


# -- phase 2: the runs ---------------------------------------------------------------------------
def run_study(args: argparse.Namespace) -> None:
    from gpt_tinystories.data import prepare
    from gpt_tinystories.tokenizer import Tokenizer

    started = time.perf_counter()
    results_dir = Path(args.results).resolve()
    out = Path(args.work).resolve() if args.work else results_dir / "work"
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GPT_TINYSTORIES_CACHE"] = str(out / "cache")
    speeds = json.loads(Path(args.speeds).read_text())
    measured = speeds["arms"]
    base_speed = args.anchor or measured["base"]["tokens_per_second"]  # budgets: ratio to base x base's speed
    train_part, held_out = split_train_head(out)
    arms = [name for name in (args.arms or ARMS) if name in measured]
    jobs = []
    for name in arms:
        config = arm_config(name)
        tokenizer = _tokenizer(config["tokenizer"], train_part, out)
        for split, path in (("train", train_part), ("validation", held_out)):  # cached before the runs race
            prepare(str(path), Tokenizer.load(tokenizer), split=split, progress=False)
        budget = int(measured[name]["ratio_to_base"] * base_speed * BUDGET_SECONDS)
        for seed in range(1, args.seeds + 1):
            values = {**config, "tokenizer": tokenizer, "data": str(train_part), "val_data": str(held_out),
                      "max_tokens": budget, "seed": seed, "device": args.device, "precision": "fp32", "threads": 1,
                "attention": "sdpa",  # the CPU's choice; all kernels compute the same, and flex would compile per run
                      "eval_every": 10**9, "eval_batches": 10**6, "sample_tokens": 150, "log_every": 25}  # fmt: skip
            config_file = out / "configs" / f"{name}-seed{seed}.json"
            config_file.parent.mkdir(exist_ok=True)
            config_file.write_text(json.dumps(values, indent=2))
            jobs.append((name, seed, budget, config_file, out / "runs" / f"{name}-seed{seed}"))
    jobs.sort(key=lambda job: job[1])  # every arm's first seed before any second one: a time limit cuts seeds
    print(f"{len(jobs)} runs ({len(arms)} arms x {args.seeds} seeds), {args.workers} at a time; setup took "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip

    def launch(job: tuple) -> dict:
        name, seed, budget, config_file, run_dir = job
        result = {"arm": name, "seed": seed, "tokens": budget, "seconds": 0.0}
        if done := _outcome(run_dir):  # finished in an earlier invocation: read, not run again
            return {**result, **done}
        left = args.time_limit - (time.perf_counter() - started)
        if left < 30:  # not worth starting: reported as not run
            return {**result, "error": f"not started: past the {args.time_limit:.0f} s time limit"}
        command = [
            sys.executable,
            "-m",
            "gpt_tinystories",
            "train",
            "--config",
            str(config_file),
            "--out",
            str(run_dir),
        ]
        begun = time.perf_counter()
        # stderr to a file, not a pipe: a run outlives a stopped study instead of dying on a closed pipe
        stderr_file = run_dir.parent / f"{run_dir.name}.stderr"
        stderr_file.parent.mkdir(exist_ok=True)
        try:
            with stderr_file.open("w") as stderr_out:
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr_out, timeout=left)
            stderr = stderr_file.read_text()
        except subprocess.TimeoutExpired:
            stderr = f"stopped at the {args.time_limit:.0f} s time limit"
        result["seconds"] = time.perf_counter() - begun
        result.update(_outcome(run_dir) or {"error": (stderr.strip().splitlines() or ["no output"])[-1]})
        print(f"{name}-seed{seed}: {result.get('bpb', result.get('error'))} ({result['seconds']:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(launch, jobs))
    write_report(results_dir, results, speeds, base_speed)


def _outcome(run_dir: Path) -> dict:
    """A run's final evaluation (its only one: eval_every is out of reach), or {} while it has none."""
    if not (run_dir / "metrics.jsonl").is_file():
        return {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return {}
    last = evals[-1]
    return {"bpb": last["val_bpb"], "loss": last["val_loss"], "sample": last["sample"], "seconds": last["seconds"]}


def write_report(out: Path, results: list[dict], speeds: dict, base_speed: float) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_description()
    by_arm: dict[str, list[dict]] = {}
    for result in results:
        by_arm.setdefault(result["arm"], []).append(result)
    rows = []
    for name, runs in by_arm.items():
        figures = [r["bpb"] for r in runs if "bpb" in r]
        mean = statistics.mean(figures) if figures else float("inf")
        spread = f"{max(figures) - min(figures):.4f}" if len(figures) > 1 else "-"
        rows.append((mean, name, figures, spread, runs))
    rows.sort(key=lambda row: row[0])
    # arms are compared with the quick start's, or where it did not run, with the recipe a round builds on
    baselines = ("base", "ws-batch-4k", "r4-recipe", "r5-recipe", "r6-recipe", "r6-w160-lr-7e-3-warmup-100",
                 "r7-w128", "r8-min-lr-0", "r9-rope", "r10-shift-windows")  # fmt: skip
    against = next((name for name in baselines if name in by_arm), "base")
    base = next((row[0] for row in rows if row[1] == against), None)
    # a later round's arms were timed beside an earlier winner, on their own day: name that timing too
    later = "".join(
        f"; this round's arms against {key.removeprefix('timed_against_')} on {t['cpu']} (load average "
        f"{t['load_before']:.1f} -> {t['load_after']:.1f})"
        for key, t in speeds.items() if key.startswith("timed_against_")
    )  # fmt: skip
    lines = [
        "# 10-minute CPU recipe study: results",
        "",
        f"Speeds (phase 1) measured on {speeds['cpu']} ({speeds['cores']} cores, torch {speeds['torch']}, load "
        f"average {speeds['load_before']:.1f} -> {speeds['load_after']:.1f}{later}) as ratios to the base arm, timed "
        f"alternately; CPU tokens/s = ratio x {base_speed:,.0f} (the base arm's), budget = {BUDGET_SECONDS} s of "
        f"that. Runs (phase 2) on {device}, fp32, {sum(r['seconds'] for r in results):,.0f} s of training in all "
        "(summed over runs, those read from --work included). Score: bits per byte on the held-out last 10% of "
        "train-head.txt, all windows.",
        "",
        f"| arm | change | CPU tokens/s | tokens | bits/byte per seed | mean | spread (max-min) | vs {against} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mean, name, figures, spread, runs in rows:
        speed = speeds["arms"][name]["ratio_to_base"] * base_speed
        change = ", ".join(f"{k}={v}" for k, v in ARMS[name].items()) or "quick start"
        seeds = ", ".join(f"{f:.4f}" for f in figures) or runs[0].get("error", "failed")
        versus = f"{mean - base:+.4f}" if base is not None and figures else "-"
        lines.append(f"| {name} | {change} | {speed:,.0f} | {runs[0]['tokens']:,} | {seeds} | {mean:.4f} | "
                     f"{spread} | {versus} |")  # fmt: skip
    best = rows[0]
    if best[4] and "sample" in best[4][0]:
        lines += [
            "",
            f"Sample of the best arm ({best[1]}, seed {best[4][0]['seed']}):",
            "",
            f"> {best[4][0]['sample']}",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"speeds": speeds, "base_speed": base_speed, "runs": results}, indent=2)
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speeds = commands.add_parser("speeds", help="phase 1: each arm's CPU training tokens/s")
    speeds.add_argument("--out", default="speeds.json")
    speeds.add_argument("--steps", type=int, default=3, help="timed steps per arm, each beside one of base")
    speeds.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    speeds.add_argument("--arms", nargs="*", choices=list(ARMS))
    speeds.add_argument("--against", choices=list(ARMS), help="time beside this arm (in --out) instead")
    run = commands.add_parser("run", help="phase 2: every arm for its 10-minute budget, then the report")
    run.add_argument("results", help="folder for the runs and report.md")
    run.add_argument("--speeds", required=True, help="phase 1's speeds.json")
    run.add_argument("--work", help="folder for data, tokenizers and run dirs (default: RESULTS_DIR/work)")
    run.add_argument("--anchor", type=float, default=4700.0, help="tokens/s of the base arm (0: as measured)")
    run.add_argument("--seeds", type=int, default=2)
    run.add_argument("--workers", type=int, default=12, help="runs at a time")
    run.add_argument("--device", default="auto")
    run.add_argument("--arms", nargs="*", choices=list(ARMS))
    run.add_argument("--time-limit", type=float, default=215, help="seconds: no run starts or goes on past it")
    args = parser.parse_args()
    measure_speeds(args) if args.command == "speeds" else run_study(args)


if __name__ == "__main__":
    main()
