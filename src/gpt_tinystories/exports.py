"""One entry point for every export format: which variants each can hold, where it may write, and the writer.

hf: a transformers model folder (hf.py); gguf: one llama.cpp file (gguf_export.py); onnx: a folder with an
ONNX graph with KV-cache inputs and outputs for onnxruntime (onnx_export.py). Each writer is imported only when
asked for: transformers, gguf and the ONNX exporter are heavy.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import fields
from pathlib import Path

from .config import ModelConfig
from .errors import UserError
from .model import GPT
from .tokenizer import Tokenizer

FORMATS = ("hf", "gguf", "onnx")
_NAMES = {"hf": "transformers", "gguf": "GGUF", "onnx": "ONNX"}


def unsupported(config: ModelConfig, format: str) -> str | None:
    """Why `format` cannot hold a model of this config (None when it can)."""
    if format == "hf":
        from .hf import architecture

        try:
            architecture(config)
        except UserError:
            return "transformers has no architecture for it"
        return None
    if format == "gguf":
        from .gguf_export import unsupported as gguf_unsupported

        return gguf_unsupported(config)
    from .onnx_export import unsupported as onnx_unsupported

    return onnx_unsupported(config)


def variant(config: ModelConfig) -> str:
    """The config's departures from GPT-2 (the defaults), e.g. "qk_norm=True, norm='rmsnorm'"."""
    shape = {"vocab_size", "d_model", "n_layer", "n_head", "context_length", "rope_theta"}
    shape |= {"dropout", "attention_dropout"}  # training only
    defaults = ModelConfig(vocab_size=config.vocab_size)
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in fields(ModelConfig)
               if f.name not in shape and getattr(config, f.name) != getattr(defaults, f.name)]  # fmt: skip
    return ", ".join(changed) or "GPT-2"


def check_format(config: ModelConfig, format: str) -> None:
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    reason = unsupported(config, format)
    if reason is None:
        return
    able = [f for f in FORMATS if unsupported(config, f) is None]
    raise UserError(
        f"{_NAMES[format]} cannot hold this model ({variant(config)}): {reason}; "
        + (f"formats that can: {', '.join(able)}" if able else "no export format can")
    )


def check_out(out: Path, is_file: bool) -> None:
    """Refuse to replace what a user has: `out` must be new (a file), or new or an empty folder (a folder)."""
    if out.is_symlink():  # the rename would replace the link, or write where it points
        raise UserError(
            f"--out {out} is a symlink (to {out.resolve()}); pass a real {'file' if is_file else 'folder'} path"
        )
    if is_file and out.exists():
        raise UserError(f"{out} exists; choose another --out")
    if not is_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is {'not empty' if out.is_dir() else 'not a folder'}; choose another --out")


def export(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, format: str = "hf",
           outtype: str | None = None) -> Path:  # fmt: skip
    """Write `model` and `tokenizer` in `format` to `out`; `outtype` (gguf only): f32, f16 or q8_0."""
    out = Path(out)
    check_format(model.config, format)
    if outtype is not None and format != "gguf":
        raise UserError(f"--outtype applies to --format gguf only, not {format}")
    check_out(out, is_file=format == "gguf")
    for module in {"hf": ["transformers"], "gguf": ["gguf"], "onnx": ["onnx", "onnxscript"]}[format]:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--format {format} needs the {module} package: pip install 'gpt-tinystories[export]'")
    if format == "hf":
        from .hf import export as export_hf

        return export_hf(model, tokenizer, out)
    if format == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(model, tokenizer, out, outtype or "f32")
    from .onnx_export import export_onnx

    return export_onnx(model, tokenizer, out)
