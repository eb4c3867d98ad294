"""Model configuration and the TinyStories presets. Plain dataclasses: no torch here."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import UserError

# The TinyStories model family (Eldan & Li, 2023, arXiv 2305.07759): width, depth and heads. Names follow
# the paper; the true parameter count depends on the vocabulary and is printed by `gpt-tinystories presets`.
PRESETS: dict[str, dict[str, int]] = {
    "1M": {"d_model": 64, "n_layer": 8, "n_head": 16},
    "3M": {"d_model": 128, "n_layer": 8, "n_head": 16},
    "8M": {"d_model": 256, "n_layer": 8, "n_head": 16},
    "28M": {"d_model": 512, "n_layer": 8, "n_head": 16},
    "33M": {"d_model": 768, "n_layer": 4, "n_head": 16},
    # What the original gpt-tinystories "28M" config really trained: hidden size 1024, 152M parameters
    # with the GPT-2 vocabulary. Kept so its results can be reproduced and compared.
    "28M-seed": {"d_model": 1024, "n_layer": 8, "n_head": 16},
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layer: int = 8
    n_head: int = 16
    context_length: int = 512
    dropout: float = 0.0  # on the embeddings and each block's output
    # On the attention weights; None: as `dropout`. PyTorch's CPU attention has no fused kernel with dropout
    # (its math path is ~3x slower), so a CPU run that wants regularisation sets this to 0.
    attention_dropout: float | None = None
    bias: bool = True
    # Variants for experiments; the defaults are GPT-2.
    position: str = "learned"  # learned | rope (rotary) | none (causal attention alone tells order)
    rope_theta: float = 10_000.0  # rotary base frequency
    norm: str = "layernorm"  # layernorm | rmsnorm
    activation: str = "gelu_tanh"  # gelu_tanh (GPT-2's "gelu_new") | gelu (exact) | relu2 (ReLU²) | swiglu
    n_kv_head: int | None = None  # key/value heads: None = n_head (multi-head), 1 = multi-query, else grouped
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    tied_embeddings: bool = True  # the LM head is the token embedding
    parallel_blocks: bool = False  # attention and MLP side by side on one norm (GPT-J), not one after the other
    # GPT-Neo, the architecture of the TinyStories paper's models
    attn_scale: float | None = None  # None: 1/sqrt(head size); GPT-Neo does not scale (1.0)
    local_window: int | None = None  # how far back the local-attention layers look (GPT-Neo: 256)
    local_layers: tuple[int, ...] = ()  # the layers that attend locally (GPT-Neo: every other one)
    # How whole sequences attend (see attention.py): auto | sdpa | flex | blocked. Decoding uses the KV cache.
    attention: str = "auto"
    document_mask: bool = False  # attention never crosses a story boundary: eos_id starts a new document
    eos_id: int | None = None  # the tokenizer's end-of-story token; needed by document_mask

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_layers", tuple(self.local_layers))  # JSON gives a list
        if self.attention_dropout is None:  # as dropout (what configs saved before the field existed meant)
            object.__setattr__(self, "attention_dropout", self.dropout)
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
            raise UserError(
                f"model config: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"choose n_head from the divisors of d_model ({shown})"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model config: {name} must be in [0, 1), got {getattr(self, name)!r}")
        for name, allowed in CHOICES.items():
            if (value := getattr(self, name)) not in allowed:
                raise UserError(f"model config: {name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.position == "rope" and self.head_size % 2:
            raise UserError(f"model config: rotary positions need an even head size, got {self.head_size}")
        if self.n_kv_head is not None and (
            isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0
            or self.n_head % self.n_kv_head
        ):  # fmt: skip
            raise UserError(f"model config: n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head!r}")
        if not self.rope_theta > 0:
            raise UserError(f"model config: rope_theta must be > 0, got {self.rope_theta!r}")
        if any(not 0 <= layer < self.n_layer for layer in self.local_layers):
            raise UserError(f"model config: local_layers must be layer numbers 0..{self.n_layer - 1}")
        if self.local_layers and not (isinstance(self.local_window, int) and self.local_window > 0):
            raise UserError("model config: local_layers need a positive local_window")
        if self.document_mask and not (
            isinstance(self.eos_id, int) and not isinstance(self.eos_id, bool) and 0 <= self.eos_id < self.vocab_size
        ):  # fmt: skip
            raise UserError(f"model config: document_mask needs eos_id, the end-of-story token id; got {self.eos_id!r}")

    @classmethod
    def from_preset(cls, preset: str, vocab_size: int, **overrides: object) -> ModelConfig:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], "vocab_size": vocab_size, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"model config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """4x the width; SwiGLU's two input projections get 2/3 of that (rounded up to a multiple of 8), so
        its MLP has about the parameters and FLOPs of the others."""
        return math.ceil(8 * self.d_model / 3 / 8) * 8 if self.activation == "swiglu" else 4 * self.d_model

    # Parameter counts from the shapes alone, so presets can be listed without building a model.
    # A test checks them against the real module for every variant.
    def num_parameters(self, non_embedding: bool = False) -> int:
        d, bias, hidden = self.d_model, int(self.bias), self.mlp_hidden
        norm = d + (bias * d if self.norm == "layernorm" else 0)
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_size
        gated = 2 if self.activation == "swiglu" else 1
        per_layer = (
            (1 if self.parallel_blocks else 2) * norm
            + (d + bias) * qkv  # attention q, k, v
            + (2 * self.head_size if self.qk_norm else 0)
            + (d + bias) * d  # attention output
            + (d + bias) * gated * hidden  # MLP up (and gate)
            + hidden * d
            + bias * d  # MLP down
        )
        body = self.n_layer * per_layer + norm + (0 if self.tied_embeddings else self.vocab_size * d)
        embeddings = self.vocab_size * d + (self.context_length * d if self.position == "learned" else 0)
        return body if non_embedding else body + embeddings


CHOICES = {
    "position": ("learned", "rope", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu_tanh", "gelu", "relu2", "swiglu"),
    "attention": ("auto", "sdpa", "flex", "blocked"),
}


# Training defaults per preset, and why:
# - lr: smaller widths tolerate (and need) larger steps; the values follow the usual ~1/width trend of GPT
#   recipes and were checked on the shared sample (1M/3M diverge above ~5e-3 at these batch sizes).
# - tokens_per_step: ~32k tokens per optimizer step keeps tiny models stepping often on a CPU; larger models
#   get larger batches, where gradient noise, not step count, limits them.
# - warmup_steps: long enough for AdamW's second-moment estimates to settle before the peak lr.
TRAIN_PRESETS: dict[str, dict[str, float | int]] = {
    "1M": {"lr": 3e-3, "tokens_per_step": 32_768, "warmup_steps": 100},
    "3M": {"lr": 2e-3, "tokens_per_step": 32_768, "warmup_steps": 100},
    "8M": {"lr": 1e-3, "tokens_per_step": 65_536, "warmup_steps": 200},
    "28M": {"lr": 6e-4, "tokens_per_step": 131_072, "warmup_steps": 300},
    "33M": {"lr": 6e-4, "tokens_per_step": 131_072, "warmup_steps": 300},
    "28M-seed": {"lr": 3e-4, "tokens_per_step": 131_072, "warmup_steps": 500},
}

PRECISIONS = ("auto", "bf16", "fp32")
# narrow_d_model's threshold: the 10-minute CPU recipe's 96 wide beat 128 at ~7-8 and ~10 passes planned at 128, tied
# at ~12 (docs/study-cpu-10min.md, rounds 7 and 13; docs/measurements.md, Narrower on a CPU this slow)
NARROW_BELOW_PASSES = 12
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    """Everything a training run needs. `None` means "the preset's default"; `resolved()` fills them in."""

    # what to train, on what
    preset: str = "8M"
    data: str = "roneneldan/TinyStories"
    val_data: str | None = None  # default: the hub's validation split, or a held-out tail of local data
    val_fraction: float = 0.05  # share of local data held out for validation when val_data is not given
    # Cut each pass's windows at a new offset (drawn from seed and epoch): many passes over little text then
    # show each passage in new contexts instead of the same windows again
    shift_windows: bool = False
    tokenizer: str = "bpe-4096"  # gpt2 | bpe-N (trained on the training data) | path to a tokenizer.json
    init_from: str | None = None  # start from these weights (and their shape and tokenizer): a run dir,
    # a checkpoint folder, or a transformers GPT-2 / GPT-Neo / GPT-NeoX folder or hub id
    context_length: int | None = None
    d_model: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    # Where a run limited by time alone plans fewer than NARROW_BELOW_PASSES passes over its data at d_model
    # (measured at its start), train this narrower width instead, heads of the same size: on a slow CPU more
    # tokens beat more width. 0 or None: never
    narrow_d_model: int | None = None
    # On the embeddings and each block's output; "auto": none for a run of a few passes over its data, 0.1 for
    # one of many (chosen at its start, by its budget and the measured speed: see train.auto_dropout)
    dropout: float | str = 0.0
    attention_dropout: float | None = None  # None: as dropout
    # model variants (see ModelConfig); None keeps GPT-2's choice
    position: str | None = None
    rope_theta: float | None = None
    norm: str | None = None
    activation: str | None = None
    n_kv_head: int | None = None
    qk_norm: bool | None = None
    bias: bool | None = None
    tied_embeddings: bool | None = None
    parallel_blocks: bool | None = None
    attention: str | None = None  # auto | sdpa | flex | blocked (see attention.py)
    document_mask: bool | None = None  # attention never crosses a story boundary (the tokenizer's EOS)
    # optimisation: linear warmup, then the schedule down to min_lr_ratio * lr
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the share of the steps after warmup spent decaying, linearly
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    batch_size: int = 16  # sequences per micro-step; accumulation makes up tokens_per_step
    tokens_per_step: int | None = None
    # budget: training stops at the first one reached (default: one epoch)
    max_steps: int | None = None
    max_tokens: int | None = None
    max_epochs: float | None = None
    max_time: str | None = None  # e.g. "90s", "15m", "2h"
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 20
    sample_tokens: int = 64
    log_every: int = 10
    checkpoint_every: int | None = None  # default: at every evaluation
    keep_last: int = 2
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient (each skipped)
    # machine
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | bf16 | fp32; auto measures bf16 against fp32 on CPUs
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    threads: int | None = None
    wandb: bool = False
    wandb_project: str = "gpt-tinystories"

    # Fields that may change when a run is resumed: they do not alter the trajectory of the weights (a resumed
    # run keeps the shape its checkpoint holds: narrow_d_model only acts at a new run's start).
    RESUMABLE_CHANGES = frozenset(
        {"max_steps", "max_tokens", "max_epochs", "max_time", "eval_every", "eval_batches", "log_every",
         "checkpoint_every", "keep_last", "device", "compile", "fsdp", "threads", "wandb", "wandb_project",
         "sample_tokens", "max_bad_steps", "narrow_d_model"}
    )  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict, source: str = "train config") -> TrainConfig:
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
        checked = {name: _check_type(name, value, hints[name], source) for name, value in values.items()}
        return cls(**checked)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> TrainConfig:
        """A copy with the preset's defaults filled in, validated: what a run dir records."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        defaults = TRAIN_PRESETS[self.preset]
        values = self.to_dict()
        for name in ("lr", "tokens_per_step", "warmup_steps"):
            if values[name] is None:
                values[name] = defaults[name]
        if values["context_length"] is None:
            values["context_length"] = ModelConfig.context_length
        if all(values[k] is None for k in ("max_steps", "max_tokens", "max_epochs", "max_time")):
            values["max_epochs"] = 1.0
        config = TrainConfig(**values)
        config.validate()
        return config

    def validate(self) -> None:
        positive = ("lr", "batch_size", "tokens_per_step", "eval_every", "eval_batches", "log_every", "keep_last",
                    "max_steps", "max_tokens", "max_epochs", "checkpoint_every", "threads",
                    "max_bad_steps")  # fmt: skip
        non_negative = ("warmup_steps", "sample_tokens", "weight_decay", "grad_clip", "narrow_d_model")
        for name in positive + non_negative:  # written so that nan and inf fail too
            value, strict = getattr(self, name), name in positive
            if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
                finite = "" if math.isfinite(value) else "finite and "
                raise UserError(f"{name} must be {finite}{'>' if strict else '>='} 0, got {value}")
        check_seed(self.seed)
        for name in ("beta1", "beta2", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if isinstance(self.dropout, str) and self.dropout != "auto":
            raise UserError(f"dropout must be a number in [0, 1) or auto, got {self.dropout!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, allowed in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if (value := getattr(self, name)) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.max_time is not None:
            parse_duration(self.max_time)
        self.narrowed(self.model_config(vocab_size=1, eos_id=0))  # width, heads and context checks

    def model_config(self, vocab_size: int, eos_id: int | None = None) -> ModelConfig:
        """The preset's shape with this config's model fields (those set) on top; `eos_id` (the tokenizer's)
        delimits stories for document_mask."""
        model_fields = {f.name for f in fields(ModelConfig)}
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name in model_fields}
        overrides.update(self.dropouts())
        if self.document_mask:
            overrides["eos_id"] = eos_id
        return ModelConfig.from_preset(self.preset, vocab_size, **{k: v for k, v in overrides.items() if v is not None})

    def narrowed(self, model: ModelConfig) -> ModelConfig | None:
        """`model` at narrow_d_model wide with heads of the same size; None where that is not narrower."""
        narrow = self.narrow_d_model
        if not narrow or narrow >= model.d_model:
            return None
        group = model.n_head // (model.n_kv_head or model.n_head)  # query heads per key/value head
        if narrow % (model.head_size * group):
            raise UserError(f"narrow_d_model={narrow} must keep heads of {model.head_size} (d_model / n_head)"
                            f"{f' in groups of {group}' if group > 1 else ''}: use a multiple of "
                            f"{model.head_size * group}")  # fmt: skip
        n_head = narrow // model.head_size
        return replace(model, d_model=narrow, n_head=n_head, n_kv_head=model.n_kv_head and n_head // group)

    def dropouts(self) -> dict[str, float | None]:
        """The model's dropout fields; "auto" is none until training chooses."""
        return {"dropout": 0.0 if self.dropout == "auto" else self.dropout, "attention_dropout": self.attention_dropout}


def check_seed(seed: int | None) -> None:
    """A seed is None or in [0, 2**63): what numpy and torch.Generator take, everywhere alike."""
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"seed must be in [0, 2**63), got {seed}")


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "15m", "1.5h"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"max_time must be a positive duration such as 90s, 15m or 2h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def load_config_file(path: str | os.PathLike, _including: tuple[Path, ...] = ()) -> dict:
    """Values from a TOML or JSON config file, or from a run dir (or its config.json), to relaunch that run.

    A file may start from another: `base = "baseline.toml"` (relative to the file) takes that file's values,
    and the file's own values override them, so an experiment is its baseline plus the lines that differ."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        elif path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        else:
            raise UserError(f"config file {path} must be .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"cannot parse config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a table of key = value pairs")
    if isinstance(values.get("train"), dict) and isinstance(values.get("model"), dict):  # a run's config.json
        values = values["train"]
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise UserError(f"{path}: base must be the path of another config file, got {base!r}")
    if path.resolve() in _including:
        raise UserError(f"{path}: config files include each other in a loop ({' -> '.join(map(str, _including))})")
    return load_config_file(path.parent / base, (*_including, path.resolve())) | values


def _check_type(name: str, value: object, hint: object, source: str) -> object:
    allowed = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if value is None and type(None) in typing.get_args(hint):
        return None
    for kind in allowed:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
    names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false"}[k] for k in allowed)
    raise UserError(f"{source}: {name} must be {names}, got {value!r}")
