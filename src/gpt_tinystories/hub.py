"""The Hugging Face hub: telling a hub id from a local path, whether the hub can be reached, loading a dataset.

Kept apart so that modules which only need to know "is this a hub id?" (checkpoint, hf) do not import the
data pipeline, and so that every network touch of the package is in one place.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LOCAL_FILES_HINT = "pass local files instead, e.g. --data TinyStories-train.txt (stories separated by <|endoftext|>)"


def is_hub_id(source: str | os.PathLike) -> bool:
    """`owner/name` that is not a local path."""
    return not Path(source).exists() and bool(_HUB_ID.match(str(source)))


def offline() -> bool:
    """HF_HUB_OFFLINE is set: transformers and datasets read their caches only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def hub_reachable() -> bool:
    # A DNS look-up fails at once without network, where datasets would retry for ~25 s before failing.
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_stories(dataset_id: str, split: str) -> Iterator[str]:
    """The "text" column of a hub dataset's split, through `datasets.load_dataset` (and its cache)."""
    if not offline() and not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to load {dataset_id}; {LOCAL_FILES_HINT}")
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except (ConnectionError, OSError) as error:
        raise UserError(
            f"cannot load {dataset_id} ({split}) from the Hugging Face hub ({error}); {LOCAL_FILES_HINT}"
        ) from None
    except ValueError as error:  # an unknown split
        raise UserError(f"cannot load split {split!r} of {dataset_id}: {str(error).splitlines()[0]}") from None
    if "text" not in dataset.column_names:
        raise UserError(f'dataset {dataset_id} has no "text" column (columns: {", ".join(dataset.column_names)})')
    return iter(dataset["text"])
