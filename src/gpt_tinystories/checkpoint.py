"""Checkpoints: safetensors weights + JSON metadata, trainer state apart; written atomically, loaded safely.

    run_dir/checkpoints/step-000400/  model.safetensors  meta.json  trainer.pt
    run_dir/checkpoints/best/         model.safetensors  meta.json

Nothing user-supplied is ever unpickled: weights load through safetensors and trainer state through
`torch.load(weights_only=True)`. meta.json records a SHA-256 of each file, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data import is_hub_id
from .errors import UserError
from .model import GPT
from .tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
WEIGHTS, META, TRAINER = "model.safetensors", "meta.json", "trainer.pt"
CHECKPOINTS = "checkpoints"


def save(
    directory: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict,
    trainer_state: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder under a temporary name, fsync it, then rename it into place.

    `extra_files` (name -> text, e.g. the tokenizer) travel with the checkpoint and are checksummed too."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    save_file(state, tmp / WEIGHTS)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    files = {path.name: _sha256(path) for path in sorted(tmp.iterdir())}
    (tmp / META).write_text(json.dumps({"format": FORMAT_VERSION, **meta, "files": files}, indent=2))
    for path in tmp.iterdir():
        _fsync(path)
    _replace_dir(tmp, directory)
    _fsync(directory.parent)
    return directory


def load_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise UserError(f"no checkpoint at {directory} (missing {META}); pass a run dir or a checkpoint folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint metadata {path} is damaged; use another checkpoint") from None
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
    return torch.load(directory / TRAINER, map_location="cpu", weights_only=True)


def step_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's step checkpoints with complete metadata, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / META).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(run_dir: str | os.PathLike) -> Path | None:
    found = step_dirs(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    for old in step_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def _verify(directory: Path, name: str) -> None:
    expected = load_meta(directory).get("files", {}).get(name)
    path = directory / name
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no {name}; use another checkpoint")
    if expected is not None and _sha256(path) != expected:
        raise UserError(f"checkpoint file {path} is damaged (checksum mismatch); use another checkpoint")


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
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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
