"""Checkpoints: safetensors weights + JSON metadata, trainer state apart; written atomically, loaded safely.

    run_dir/checkpoints/step-000400/  model.safetensors  meta.json  trainer.pt
    run_dir/checkpoints/best/         model.safetensors  meta.json

Nothing user-supplied is ever unpickled: weights load through safetensors and trainer state through
`torch.load(weights_only=True)`. meta.json records a SHA-256 of each file, checked on load; `latest()` skips a
damaged step checkpoint (with a warning) in favour of the one before it. A crash at any moment leaves at most a
hidden `.NAME.tmp-PID` / `.NAME.old-PID` folder, which the next prune() tidies away.

`RunMeta` is meta.json as a dataclass, the one reader and writer of its keys; `Checkpointer` is a training
run's view of its checkpoints (where to resume, restoring, saving step and `best`, pruning); `load_model()` is
everyone else's way in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import atomic
from .config import ModelConfig, TrainConfig
from .errors import UserError, write_error
from .hub import is_hub_id
from .model import GPT
from .tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
WEIGHTS, META, TRAINER = "model.safetensors", "meta.json", "trainer.pt"
CHECKPOINTS = "checkpoints"


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or altered: skip it, or pick another."""


# -- the run metadata ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerRef:
    """The tokenizer a checkpoint was trained with: its file in the checkpoint folder, and its hash."""

    name: str | None = None
    hash: str | None = None
    file: str = TOKENIZER_FILE


@dataclass(frozen=True)
class RunMeta:
    """A checkpoint's meta.json (format FORMAT_VERSION): the only place its keys are written and read.

    Every field has a default because checkpoints made by hand (tests, conversions) record only some of them;
    one written by training records all. `train_config` stays the plain `TrainConfig.to_dict()` it was saved
    as: inference never needs it, so a partial one must not stop a model from loading (`train_settings()`
    parses it when a run is resumed)."""

    step: int | None = None
    tokens: int | None = None
    train_seconds: float = 0.0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient, in all
    bad_steps_in_a_row: int = 0  # and the streak of them at this step
    val_loss: float | None = None
    best_val_loss: float | None = None
    precision: str | None = None  # the autocast precision the run measured and kept: fp32 | bf16
    attention_precision: str | None = None  # what attention ran in under it (trainer.choose_precision)
    dropout_mask: str | None = None  # "packed": model.Dropout's CPU draws; None (made before them): PyTorch's
    model_config: ModelConfig | None = None
    train_config: dict = field(default_factory=dict)
    tokenizer: TokenizerRef = TokenizerRef()
    files: dict[str, str] = field(default_factory=dict)  # SHA-256 of every other file; written by save()
    format: int = FORMAT_VERSION

    @classmethod
    def read(cls, directory: str | os.PathLike) -> RunMeta:
        return cls.from_json(load_meta(directory), Path(directory))

    @classmethod
    def from_json(cls, data: dict, directory: Path) -> RunMeta:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # a key of a later minor change is ignored
        if values.get("model_config") is not None:
            try:
                values["model_config"] = ModelConfig.from_dict(values["model_config"])
            except (KeyError, TypeError):
                raise UserError(f"checkpoint {directory} has no valid model_config in {META}; use another "
                                "checkpoint") from None  # fmt: skip
        try:
            recorded = values.get("tokenizer") or {}
            values["tokenizer"] = TokenizerRef(
                **{f.name: recorded[f.name] for f in fields(TokenizerRef) if f.name in recorded}
            )
            return cls(**values)
        except TypeError:
            raise DamagedCheckpoint(
                f"checkpoint metadata {directory / META} is damaged; use another checkpoint"
            ) from None

    def to_json(self) -> dict:
        """The keys training writes, in the order meta.json has always had (format and files are save()'s)."""
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "skipped_steps": self.skipped_steps, "bad_steps_in_a_row": self.bad_steps_in_a_row,
                "val_loss": self.val_loss, "best_val_loss": self.best_val_loss, "precision": self.precision,
                "attention_precision": self.attention_precision, "dropout_mask": self.dropout_mask,
                "model_config": self.model_config.to_dict() if self.model_config else None,
                "train_config": self.train_config, "tokenizer": asdict(self.tokenizer)}  # fmt: skip

    @property
    def precisions(self) -> tuple[str, str]:
        """(precision, attention's) to resume with. Checkpoints from before attention's was measured ran it in
        fp32 on a CPU (and on CUDA it follows autocast, which leaves the flag unread)."""
        return self.precision, self.attention_precision or "fp32"

    def train_settings(self, source: str) -> TrainConfig:
        """The run's TrainConfig; `source` names the checkpoint in errors."""
        return TrainConfig.from_dict(self.train_config, source=source)


# -- one checkpoint folder ---------------------------------------------------------------------------
def save(
    directory: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict,
    trainer_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder under a temporary name, fsync it, then rename it into place.

    `meta` is a RunMeta's `to_json()` (or any part of one); `extra_files` (name -> text, e.g. the tokenizer)
    travel with the checkpoint and are checksummed too."""
    directory = Path(directory)
    try:
        with atomic.staging_dir(directory) as tmp:
            _write_weights(tmp, weights)
            _write_meta(tmp, meta, trainer_state, extra_files or {})
    except (SafetensorError, RuntimeError) as error:  # how safetensors and torch.save report e.g. a full disk
        raise write_error(error, atomic.temporary(directory)) from error
    return directory


def _write_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, folder / WEIGHTS)


def _write_meta(folder: Path, meta: dict, trainer_state: dict | None, extra_files: dict[str, str]) -> None:
    """The trainer state and extra files, then meta.json with the checksum of every file before it."""
    if trainer_state is not None:
        torch.save(trainer_state, folder / TRAINER)
    for name, text in extra_files.items():
        (folder / name).write_text(text)  # inside the staging folder: the folder's rename makes it atomic
    files = {path.name: _sha256(path) for path in sorted(folder.iterdir())}
    (folder / META).write_text(json.dumps({"format": FORMAT_VERSION, **meta, "files": files}, indent=2))


def load_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise UserError(f"no checkpoint at {directory} (missing {META}); pass a run dir or a checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("format", 0), int):
        raise DamagedCheckpoint(f"checkpoint metadata {path} is damaged; use another checkpoint")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise UserError(f"checkpoint {directory} has format {meta.get('format')}, newer than this version reads "
                        f"({FORMAT_VERSION}); upgrade gpt-tinystories")  # fmt: skip
    return meta


def load_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    directory = Path(directory)
    _verify(directory, WEIGHTS)
    state = load_file(directory / WEIGHTS, device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {directory} does not fit the model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); check the preset and model settings")  # fmt: skip


def load_trainer_state(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    _verify(directory, TRAINER)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols its own files never use
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(directory / TRAINER, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{directory / TRAINER} holds objects other than tensors; refusing to unpickle it") from None


def step_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's step checkpoints with complete metadata, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / META).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest step checkpoint whose every file matches its checksum; damaged ones are skipped with a warning.

    Raises when the run holds checkpoints but none is whole: starting over there would silently discard it."""
    found = step_dirs(run_dir)
    problems = []
    for directory in reversed(found):
        try:
            verify(directory)
        except DamagedCheckpoint as error:
            problems.append(str(error))
            continue
        for problem in problems:
            print(f"warning: {problem}; resuming from {directory.name} instead", file=sys.stderr)
        return directory
    if found:
        raise UserError(
            f"every checkpoint in {Path(run_dir) / CHECKPOINTS} is damaged ({problems[0]}); "
            "restore one, or delete them (or choose another --out) to start over"
        )
    return None


def verify(directory: str | os.PathLike) -> None:
    """Check every file meta.json lists against its SHA-256; raises DamagedCheckpoint naming the first bad one."""
    directory = Path(directory)
    for name in load_meta(directory).get("files", {}):
        _verify(directory, name)


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints, and what crashed saves left behind."""
    root = Path(run_dir) / CHECKPOINTS
    for old in step_dirs(run_dir)[:-keep_last]:
        atomic.remove_dir(old)  # renamed first: a kill half-way through never leaves a half-deleted checkpoint
    for left, target in atomic.moved_aside(root):  # by a save killed between its two renames
        if not target.exists() and _is_whole(left):
            atomic.put_back(left, target)
        else:
            shutil.rmtree(left, ignore_errors=True)
    for left in root.glob(".*.tmp-*"):
        if left.name.rsplit("-", 1)[-1] != str(os.getpid()):  # not a save of this process in progress
            shutil.rmtree(left, ignore_errors=True)


def _is_whole(directory: Path) -> bool:
    try:
        verify(directory)
    except UserError:
        return False
    return True


def _verify(directory: Path, name: str) -> None:
    expected = load_meta(directory).get("files", {}).get(name)
    path = directory / name
    if not path.is_file():
        raise DamagedCheckpoint(f"checkpoint {directory} has no {name}; use another checkpoint")
    if expected is not None and _sha256(path) != expected:
        raise DamagedCheckpoint(f"checkpoint file {path} is damaged (checksum mismatch); use another checkpoint")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or a run dir's best checkpoint (its newest when it has no best yet)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    best = path / CHECKPOINTS / "best"
    if (best / META).is_file():
        return best
    newest = latest(path)
    if newest is None:
        raise UserError(
            f"no checkpoint at {path}; pass a run dir or a checkpoint folder (one holding {META} and {WEIGHTS})"
        )
    return newest


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder, or a run dir that holds checkpoints."""
    path = Path(path)
    return (path / META).is_file() or (path / CHECKPOINTS).is_dir()


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """The model and tokenizer of a run dir or checkpoint folder, or of a transformers GPT-2 / GPT-Neo / GPT-NeoX
    folder or hub id (e.g. roneneldan/TinyStories-33M), ready for inference."""
    if not is_checkpoint(path) and ((Path(path) / "config.json").is_file() or is_hub_id(path)):
        from .hf import load_pretrained

        model, tokenizer, meta = load_pretrained(path)
        return model.to(device), tokenizer, meta
    directory = resolve(path)
    raw = load_meta(directory)
    meta = RunMeta.from_json(raw, directory)
    if meta.model_config is None:
        raise UserError(f"checkpoint {directory} has no valid model_config in {META}; use another checkpoint")
    _verify(directory, TOKENIZER_FILE)
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    if meta.tokenizer.hash not in (None, tokenizer.hash):
        raise UserError(f"{directory / TOKENIZER_FILE} is not the tokenizer this checkpoint was trained with")
    model = GPT(meta.model_config).to(device)
    load_weights(directory, model)
    return model.eval(), tokenizer, {**raw, "path": str(directory)}


# -- a run's checkpoints -----------------------------------------------------------------------------
class Checkpointer:
    """The checkpoints of one run dir: which one a run resumes from, what it restores, saving and pruning.

    Training makes one per run: `resume_point()` before anything is written, `restore()` once the model
    exists, `start()` with what every checkpoint of the run shares, then `save()` at each checkpoint (the
    step's folder, pruning, and `best` when the validation loss is the lowest so far)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int) -> None:
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        self.root = self.run_dir / CHECKPOINTS
        self.resumed: RunMeta | None = None  # the checkpoint the run resumes from, and its folder
        self.resumed_from: Path | None = None
        self.best_val = math.inf
        self.last_saved: int | None = None  # the step of the newest checkpoint written (or resumed from)
        self._run = RunMeta()  # what every checkpoint of this run records alike; see start()
        self._files: dict[str, str] = {}
        self._device = torch.device("cpu")

    def resume_point(self, config: TrainConfig, required: bool) -> RunMeta | None:
        """The newest whole checkpoint's metadata, if any; refuses a run dir that holds a run of other settings."""
        directory = latest(self.run_dir)
        if directory is None:
            if required:
                raise UserError(f"--resume: {self.run_dir} holds no checkpoint; drop --resume to start a new run there")
            return None
        meta = RunMeta.read(directory)
        saved = meta.train_settings(source=str(directory))
        changed = [
            f.name
            for f in fields(TrainConfig)
            if getattr(saved, f.name) != getattr(config, f.name) and f.name not in TrainConfig.RESUMABLE_CHANGES
        ]
        if changed:
            diff = ", ".join(f"{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in changed)
            raise UserError(
                f"{self.run_dir} holds a checkpoint of a different config ({diff}); pass another --out for a "
                "new run, or the same settings to resume this one"
            )
        self.resumed, self.resumed_from, self.last_saved = meta, directory, meta.step
        self.best_val = meta.best_val_loss if meta.best_val_loss is not None else math.inf
        return meta

    def resumed_tokenizer(self) -> Tokenizer:
        """The run dir's tokenizer, checked against the checkpoint being resumed."""
        tokenizer = Tokenizer.load(self.run_dir / TOKENIZER_FILE)
        if tokenizer.hash != self.resumed.tokenizer.hash:
            raise UserError(
                f"{self.run_dir / TOKENIZER_FILE} is not the tokenizer of checkpoint {self.resumed_from}; restore it"
            )
        return tokenizer

    def restore(self, model: torch.nn.Module) -> dict:
        """Load the resumed checkpoint's weights into `model` and its RNG state into torch; return the optimizer
        state (for `DataParallelLoss.load_optimizer_state`)."""
        load_weights(self.resumed_from, model)
        state = load_trainer_state(self.resumed_from)
        torch.set_rng_state(state["rng"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        return state["optimizer"]

    def start(self, config: TrainConfig, model_config: ModelConfig, precisions: tuple[str, str],
              tokenizer: Tokenizer, device: torch.device, dropout_mask: str) -> None:  # fmt: skip
        """What every checkpoint of the run records alike; each checkpoint folder carries the tokenizer too.
        `precisions`: the run's precision and its attention's (trainer.choose_precision); `dropout_mask`: "packed"
        (model.Dropout's CPU draws) or "bernoulli" (PyTorch's, for a run resumed from before them)."""
        precision, attention_precision = precisions
        self._run = RunMeta(precision=precision, attention_precision=attention_precision, dropout_mask=dropout_mask,
                            model_config=model_config, train_config=config.to_dict(),
                            tokenizer=TokenizerRef(tokenizer.name, tokenizer.hash))  # fmt: skip
        self._files = {TOKENIZER_FILE: tokenizer.backend.to_str()}  # each checkpoint folder is self-contained
        self._device = device

    def save(self, weights: dict, optimizer_state: dict, val_loss: float | None, **progress: int | float) -> None:
        """Checkpoint the step (`progress`: step, tokens, train_seconds, skipped_steps, bad_steps_in_a_row),
        prune old steps, and rewrite `best` when `val_loss` is the lowest yet."""
        best = min(self.best_val, val_loss if val_loss is not None else math.inf)
        meta = replace(self._run, **progress, val_loss=val_loss, best_val_loss=best if math.isfinite(best) else None)
        trainer_state = {"optimizer": optimizer_state, "rng": torch.get_rng_state()}
        if self._device.type == "cuda":
            trainer_state["cuda"] = torch.cuda.get_rng_state_all()
        save(self.root / f"step-{meta.step:06d}", weights, meta.to_json(), trainer_state, self._files)
        prune(self.run_dir, self.keep_last)
        self.last_saved = meta.step
        if val_loss is not None and val_loss < self.best_val:
            self.best_val = val_loss
            save(self.root / "best", weights, replace(meta, best_val_loss=val_loss).to_json(), None, self._files)

    def last_good(self) -> Path | None:
        """The newest checkpoint this run wrote or resumed from."""
        return None if self.last_saved is None else self.root / f"step-{self.last_saved:06d}"


_remove_dir = atomic.remove_dir  # the name the numerical-fault tests use to drop a checkpoint as a crash would
