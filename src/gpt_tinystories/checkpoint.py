"""Checkpoints: safetensors weights + JSON metadata, trainer state apart; written atomically, loaded safely.

    run_dir/checkpoints/step-000400/  model.safetensors  meta.json  trainer.pt
    run_dir/checkpoints/best/         model.safetensors  meta.json

Nothing user-supplied is ever unpickled: weights load through safetensors and trainer state through
`torch.load(weights_only=True)`. meta.json records a SHA-256 of each file, checked on load; `latest()` skips a
damaged step checkpoint (with a warning) in favour of the one before it. A crash at any moment leaves at most a
hidden `.NAME.tmp-PID` / `.NAME.old-PID` folder, which the next prune() tidies away.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data import is_hub_id
from .errors import UserError, write_error
from .model import GPT
from .tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
WEIGHTS, META, TRAINER = "model.safetensors", "meta.json", "trainer.pt"
CHECKPOINTS = "checkpoints"
# Test-only fault injection, read by save(): "N:STAGE" SIGKILLs this process at STAGE (weights | meta | replace)
# of its N-th save, so the crash test can prove a kill in the middle of a checkpoint write never leaves a
# checkpoint that loads. Never set in normal use.
KILL_IN_SAVE_ENV = "GPT_TINYSTORIES_TEST_KILL_IN_SAVE"
_saves = 0


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or altered: skip it, or pick another."""


def save(
    directory: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict,
    trainer_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder under a temporary name, fsync it, then rename it into place.

    `extra_files` (name -> text, e.g. the tokenizer) travel with the checkpoint and are checksummed too."""
    global _saves
    _saves += 1
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
        save_file(state, tmp / WEIGHTS)
        _fault_point("weights")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        files = {path.name: _sha256(path) for path in sorted(tmp.iterdir())}
        (tmp / META).write_text(json.dumps({"format": FORMAT_VERSION, **meta, "files": files}, indent=2))
        _fault_point("meta")
        for path in tmp.iterdir():
            _fsync(path)
    except BaseException as error:  # e.g. disk full: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (SafetensorError, RuntimeError)):  # how safetensors and torch.save report it
            raise write_error(error, tmp) from error
        raise
    _replace_dir(tmp, directory)
    _fsync(directory.parent)
    return directory


def _fault_point(stage: str) -> None:
    """See KILL_IN_SAVE_ENV: a real SIGKILL of this process, exactly where a crash would hurt most."""
    if (spec := os.environ.get(KILL_IN_SAVE_ENV)) and spec == f"{_saves}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


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
        _remove_dir(old)  # renamed first: a kill half-way through never leaves a half-deleted checkpoint
    for left in root.glob(".*.old-*"):  # moved aside by a _replace_dir that was killed before the rename
        target = root / left.name[1:].rsplit(".old-", 1)[0]
        if not target.exists() and _is_whole(left):
            os.replace(left, target)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; a directory cannot be replaced in one step, so move the old one aside first."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
        _fault_point("replace")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove_dir(directory: Path) -> None:
    doomed = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


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
    """The model and tokenizer of a run dir or checkpoint folder, or of a transformers GPT-2 / GPT-Neo folder or
    hub id (e.g. roneneldan/TinyStories-33M), ready for inference."""
    if not is_checkpoint(path) and ((Path(path) / "config.json").is_file() or is_hub_id(path)):
        from .hf import load_pretrained

        model, tokenizer, meta = load_pretrained(path)
        return model.to(device), tokenizer, meta
    directory = resolve(path)
    meta = load_meta(directory)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {directory} has no valid model_config in {META}; use another checkpoint") from None
    _verify(directory, TOKENIZER_FILE)
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    if tokenizer.hash != meta.get("tokenizer", {}).get("hash", tokenizer.hash):
        raise UserError(f"{directory / TOKENIZER_FILE} is not the tokenizer this checkpoint was trained with")
    model = GPT(config).to(device)
    load_weights(directory, model)
    return model.eval(), tokenizer, {**meta, "path": str(directory)}
