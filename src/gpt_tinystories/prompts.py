"""Story beginnings to judge a model on: the TinyStories authors' 44 (shipped in the package), or any file.

A prompts file is a YAML or JSON list of strings, or plain text with one prompt per line. Prompts are kept
exactly as written: several of the authors' end mid-word or with an open quote, and the model must go on
from there.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

from .errors import UserError

BUILTIN = "tinystories-44"
BUILTIN_FILE = "tinystories-44.yaml"  # byte for byte the dataset's "Evaluation prompts.yaml" (CDLA-Sharing-1.0)
NOTICE = "the TinyStories authors' 44 evaluation prompts (Eldan & Li, 2023; CDLA-Sharing-1.0)"


def builtin_path() -> Path:
    return Path(str(files("gpt_tinystories") / "prompt_sets" / BUILTIN_FILE))


def load_prompts(source: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The prompts of `source` (None or "tinystories-44": the shipped set) and a name for reports."""
    if source is None or str(source) == BUILTIN:
        return parse_prompts(builtin_path().read_text(encoding="utf-8"), BUILTIN_FILE), BUILTIN
    path = Path(source)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}; pass a YAML/JSON list of strings or a text file with "
                        f"one prompt per line (or leave --prompts out for {BUILTIN})")  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the prompts file as UTF-8") from None
    return parse_prompts(text, str(path)), str(path)


def parse_prompts(text: str, name: str) -> list[str]:
    """A list of non-empty prompt strings from YAML, JSON or one-prompt-per-line text."""
    suffix = Path(name).suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        prompts = _structured(text, name, suffix)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{name} holds no prompts; give at least one story beginning")
    return prompts


def _structured(text: str, name: str, suffix: str) -> list[str]:
    fix = 'it must be a list of strings, e.g. ["Once upon a time", "Tom had a ball."]'
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{name} is not valid JSON ({error}); {fix}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:  # its message carries the line and column
            raise UserError(f"{name} is not valid YAML ({' '.join(str(error).split())[:200]}); {fix}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise UserError(f"{name} holds a {type(data).__name__}, not a list of prompts; {fix}")
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise UserError(f"{name}: item {index + 1} is a {type(item).__name__}, not a string; {fix}")
        if not item.strip():
            raise UserError(f"{name}: item {index + 1} is an empty prompt; remove it or write a story beginning")
    return data
