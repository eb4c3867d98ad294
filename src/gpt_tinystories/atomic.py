"""Writing files and folders so that a crash at any moment leaves the old version or the new one, never a mix.

Everything the package writes goes through here: text and JSON files (`write_text`, `write_json`), files
written by other libraries (`replacing`: matplotlib figures), and whole folders (`staging_dir`: checkpoints,
prepared data, transformers exports). Each is written under a hidden temporary name beside its target,
`.NAME.tmp-PID`, and renamed into place; a folder that already exists is first moved aside to
`.NAME.old-PID`, because a folder cannot be replaced in one rename. A crash leaves at most such hidden names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary(path: Path, tag: str = "tmp") -> Path:
    """The hidden name `path` is written under (or moved aside to, with tag "old") by this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def target_of(path: str | os.PathLike) -> Path:
    """The path a temporary name stands for (`temporary`'s inverse, in any part of it: a file in a staging
    folder too), for messages; other paths as they are."""
    hidden = re.compile(r"\.(.+)\.(?:tmp|old)-\d+(?:\.[^.]*)?")
    return Path(*((match[1] if (match := hidden.fullmatch(part)) else part) for part in Path(path).parts))


def write_text(path: str | os.PathLike, text: str, sync: bool = False) -> None:
    """Replace `path` by `text` (UTF-8); `sync` also flushes it to disk before the rename."""
    with replacing(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        if sync:
            file.flush()
            os.fsync(file.fileno())


def write_json(path: str | os.PathLike, data: object, sync: bool = False) -> None:
    write_text(path, json.dumps(data, indent=2), sync)


@contextlib.contextmanager
def replacing(path: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed onto `path` if the block succeeds, else
    removed. `keep_suffix` ends the temporary name with `path`'s suffix (for writers that read the format
    from it, like matplotlib)."""
    tmp = temporary(path)
    if keep_suffix:
        tmp = tmp.with_name(tmp.name + path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(target: Path, sync: bool = True) -> Iterator[Path]:
    """An empty temporary folder to fill; on success it replaces `target` (which may exist), else it is removed.

    With `sync`, every file in it and then the parent folder are flushed to disk around the rename, so a
    power cut cannot leave a renamed folder of empty files."""
    tmp = temporary(target)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process that had our pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if sync:
            for path in tmp.iterdir():
                fsync(path)
        replace_dir(tmp, target)
        if sync:
            fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`. An existing target is moved aside first (a crash between the two renames
    leaves it at `.NAME.old-PID`, where `moved_aside` finds it) and deleted after."""
    old = move_aside(target) if target.exists() else None
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_aside(target: Path) -> Path:
    old = temporary(target, "old")
    os.replace(target, old)
    return old


def moved_aside(root: Path) -> Iterator[tuple[Path, Path]]:
    """Folders in `root` that a crashed `replace_dir` left moved aside, each with the name it had."""
    for left in root.glob(".*.old-*"):
        yield left, root / left.name[1:].rsplit(".old-", 1)[0]


def put_back(left: Path, target: Path) -> None:
    """Undo `move_aside`: the folder takes its old name again."""
    os.replace(left, target)


def remove_dir(directory: Path) -> None:
    """Delete a folder, renaming it first: a crash half-way through never leaves a half-deleted folder in place."""
    doomed = temporary(directory)
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
