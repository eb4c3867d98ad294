"""The data pipeline as a few plain verbs: read stories, prepare token shards, draw batches of windows.

stories (hub id | .txt | .jsonl | .parquet | folder)  ->  prepare()  ->  uint16 shards + meta.json
->  TokenWindows: windows of context+1 tokens, a pure function of (seed, position)
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import atomic, hub
from .errors import UserError
from .hub import hub_reachable as hub_reachable  # re-exported: `make demo` and users call data.hub_reachable
from .hub import is_hub_id
from .tokenizer import EOS, Tokenizer

DEFAULT_DATASET = "roneneldan/TinyStories"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
FORMAT_VERSION = 1
META_FILE = "meta.json"
SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB per uint16 shard
_READ_CHUNK = 8 << 20


# -- reading stories -----------------------------------------------------------------------------
def find_files(source: str | os.PathLike) -> list[Path]:
    """The supported files of a local source (a file or a folder searched recursively), sorted."""
    path = Path(source)
    if is_prepared(path):
        raise UserError(f"{path} holds prepared tokens, not stories; pass the text it was prepared from")
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise UserError(f"unsupported data file {path}; use one of: {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if not path.is_dir():  # a device or a pipe, such as /dev/null or <(zcat ...)
        kinds = ", ".join(SUPPORTED_SUFFIXES)
        raise UserError(f"{path} is neither a file nor a folder; point --data at a {kinds} file or a folder of them")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
    if not found:
        raise UserError(f"folder {path} holds no {', '.join(SUPPORTED_SUFFIXES)} file; point --data at one")
    return found


def is_prepared(source: str | os.PathLike) -> bool:
    """A folder written by prepare()."""
    return (Path(source) / META_FILE).is_file()


def check_source(source: str | os.PathLike) -> None:
    if not Path(source).exists() and not is_hub_id(source):
        raise UserError(
            f"data not found: {source}; pass a .txt, .jsonl or .parquet file, a folder of them, "
            f"or a Hugging Face dataset id such as {DEFAULT_DATASET}"
        )


def iter_stories(source: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Every story of a source, stripped, empty ones skipped. `split` applies to hub datasets only.

    The source is checked (and a hub dataset loaded) before this returns, so errors come before any output.
    """
    check_source(source)
    if is_hub_id(source):
        return _stripped(hub.load_stories(str(source), split))
    files = find_files(source)
    readers = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}
    return _stripped(story for path in files for story in readers[path.suffix](path))


def _stripped(stories: Iterator[str | None]) -> Iterator[str]:
    for story in stories:
        story = (story or "").strip()
        if story:
            yield story


def _iter_txt(path: Path) -> Iterator[str]:
    """The official format: stories separated by `<|endoftext|>` (on a line of its own). Streams the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, offset = "", 0
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            if b"\x00" in chunk:
                raise UserError(f"{path} looks binary (NUL byte at offset {offset + chunk.index(0)}); pass a text file")
            try:
                pending += decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path} is not valid UTF-8 (byte offset {offset + error.start}); re-encode it as UTF-8"
                ) from None
            offset += len(chunk)
            *stories, pending = pending.split(EOS)
            yield from stories
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8: it ends inside a character; re-encode it as UTF-8") from None
    yield pending


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(
                    f'{path}:{number} is not a JSON object in UTF-8; each line must be {{"text": ...}}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{path}:{number} has no string field "text"; each line must be {{"text": ...}}')
            yield record["text"]


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"cannot read parquet file {path}: {str(error).splitlines()[0]}") from None
    if "text" not in file.schema_arrow.names:
        raise UserError(f'{path} has no "text" column (columns: {", ".join(file.schema_arrow.names)})')
    for batch in file.iter_batches(columns=["text"]):
        yield from batch.column(0).to_pylist()


# -- prepared shards -----------------------------------------------------------------------------
@dataclass
class PreparedData:
    """A prepared split: token shards (each story followed by EOS) and their metadata."""

    path: Path
    meta: dict
    from_cache: bool = False

    @classmethod
    def open(cls, path: str | os.PathLike, from_cache: bool = False) -> PreparedData:
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{path} is not prepared data (no {META_FILE}); run 'gpt-tinystories prepare'")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{path} was prepared in format {meta.get('format')}; prepare it again")
        return cls(path, meta, from_cache)

    @property
    def num_tokens(self) -> int:
        return self.meta["tokens"]

    def tokens(self) -> list[np.ndarray]:
        """The token stream, one read-only memmap per shard."""
        dtype = np.dtype(self.meta["dtype"])
        return [
            np.memmap(self.path / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) for s in self.meta["shards"]
        ]

    def holdout(self, fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The token stream cut at a story boundary: (the first 1 - fraction, the last ~fraction)."""
        arrays, eos = self.tokens(), self.meta["tokenizer"]["eos_id"]
        cut = int(self.num_tokens * (1 - fraction))
        for i, array in enumerate(arrays):
            if cut < len(array):
                ends = np.flatnonzero(array[:cut] == eos)  # the last story end before the cut
                cut = int(ends[-1]) + 1 if len(ends) else cut
                return [*arrays[:i], array[:cut]], [array[cut:], *arrays[i + 1 :]]
            cut -= len(array)
        return arrays, []

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.meta["tokenizer"]["hash"] != tokenizer.hash:
            raise UserError(
                f"{self.path} was prepared with tokenizer {self.meta['tokenizer']['name']} "
                f"(hash {self.meta['tokenizer']['hash']}), not {tokenizer.name} (hash {tokenizer.hash}); "
                "prepare the data again with the model's tokenizer"
            )


def default_cache_dir() -> Path:
    root = (
        os.environ.get("GPT_TINYSTORIES_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt-tinystories"
    )
    return Path(root) / "data"


def _source_fingerprint(source: str | os.PathLike, split: str) -> dict:
    if is_hub_id(source):
        return {"hub": str(source), "split": split}
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in find_files(source)]}


def prepare(
    source: str | os.PathLike,
    tokenizer: Tokenizer,
    split: str = "train",
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 2048,
    progress: bool = True,
) -> PreparedData:
    """Tokenize every story of `source`, append EOS to each, and pack them into uint16 (or uint32) shards.

    The result goes to `out`, or else to a cache folder keyed by the source and the tokenizer: preparing the
    same input again returns at once. Everything is written under a temporary name and renamed at the end.
    """
    if is_prepared(source):  # already prepared: use as it is
        return PreparedData.open(source, from_cache=True)
    check_source(source)
    key_data = {
        "format": FORMAT_VERSION,
        "source": _source_fingerprint(source, split),
        "tokenizer": tokenizer.hash,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(out) if out is not None else Path(cache_dir or default_cache_dir()) / f"{split}-{key}"
    cached = _cached(target, key, out is not None)
    if cached is not None:
        return cached
    stories = iter_stories(source, split)  # fails here, before any file or output, on a bad source
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with atomic.staging_dir(target) as tmp:  # an empty folder or stale cached data there is replaced
        counts = _tokenize(stories, tokenizer, tmp, _source_bytes(source), split, batch_size, progress)
        if counts["stories"] == 0:
            raise UserError(f"no stories found in {source}; is the file empty?")
        meta = {"format": FORMAT_VERSION, "key": key, "source": str(source), "split": split,
                "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size,
                              "eos_id": tokenizer.eos_id},
                **counts, "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
        atomic.write_json(tmp / META_FILE, meta, sync=True)
    return PreparedData(target, meta)


def _cached(target: Path, key: str, explicit: bool) -> PreparedData | None:
    """The data already prepared at `target` under `key`, if any; refuses to overwrite other data there."""
    if (target / META_FILE).is_file():
        existing = PreparedData.open(target)
        if existing.meta.get("key") == key:
            existing.from_cache = True
            return existing
        if explicit:
            raise UserError(f"{target} already holds other prepared data; choose another --out or delete it")
    elif target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not prepared data; choose another --out")
    return None


def _source_bytes(source: str | os.PathLike) -> int | None:
    return None if is_hub_id(source) else sum(p.stat().st_size for p in find_files(source))


def _tokenize(
    stories: Iterator[str], tokenizer: Tokenizer, out: Path, total: int | None, split: str, batch_size: int,
    progress: bool,
) -> dict:  # fmt: skip
    """Encode `stories` into shards in `out`; the counts that meta.json records, in its order."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    # disable=None shows the bar on a terminal only; leave=False clears it before any message that follows.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {split}", leave=False,
               disable=None if progress else True)  # fmt: skip
    writer = _ShardWriter(out, dtype)
    count = text_bytes = 0
    try:
        for batch in _batched(stories, batch_size):
            text_bytes += _encode_into(writer, tokenizer, batch)
            count += len(batch)
            bar.update(text_bytes - bar.n)
        shards = writer.close()
    finally:
        bar.close()
        writer.close()
    tokens = sum(s["tokens"] for s in shards)
    return {"dtype": dtype.name, "stories": count, "tokens": tokens, "text_bytes": text_bytes, "shards": shards}


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_into(writer: _ShardWriter, tokenizer: Tokenizer, stories: list[str]) -> int:
    """Encode a batch of stories (in parallel), append EOS to each, write them; return their UTF-8 bytes."""
    ids = tokenizer.encode_batch(stories)
    eos = tokenizer.eos_id
    for row in ids:
        row.append(eos)  # every story ends with EOS: the model must learn to finish a story
    writer.write(np.fromiter((t for row in ids for t in row), dtype=writer.dtype, count=sum(map(len, ids))))
    return sum(len(s.encode()) for s in stories)


class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype) -> None:
        self.directory, self.dtype = directory, dtype
        self.shards: list[dict] = []
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == SHARD_TOKENS:
                self._next_shard()
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            self.file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self._close_file()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")  # noqa: SIM115 - closed by _close_file
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards


# -- batches -------------------------------------------------------------------------------------
class TokenWindows:
    """Non-overlapping windows of `context_length + 1` tokens (inputs and shifted targets) of a token stream.

    Window order is a pure function of the seed: epoch e visits every window once, in a permutation drawn
    from (seed, e). The batch at global position p is therefore the same in a resumed run and on any rank,
    which is what exact resume and multi-process training rely on. With `seed=None` windows come in order
    (fixed evaluation batches). With `shift=True` each epoch also cuts its windows at an offset drawn from
    (seed, e): a run of many passes over little text then sees each passage in new contexts, not the same
    windows again (each array keeps `context_length - 1` tokens spare for that, so it may hold one window fewer).
    """

    def __init__(
        self,
        tokens: list[np.ndarray],
        context_length: int,
        seed: int | None = 0,
        name: str = "data",
        shift: bool = False,
    ) -> None:
        self.arrays, self.context_length, self.seed = tokens, context_length, seed
        self.shift = shift and seed is not None
        spare = context_length - 1 if self.shift else 0
        counts = [max(len(array) - 1 - spare, 0) // context_length for array in tokens]
        self.starts = np.cumsum([0, *counts])
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            raise UserError(
                f"{name} holds {sum(map(len, tokens)):,} tokens, fewer than one window of context_length + 1 = "
                f"{context_length + 1}{f' and the {spare} that shift_windows keeps spare' if spare else ''}; "
                "use a smaller context_length or more data"
            )

    def __len__(self) -> int:
        return self.num_windows

    @lru_cache(maxsize=2)  # noqa: B019 - the cache lives as long as the sampler, which is what we want
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def window_index(self, position: int) -> int:
        epoch, index = divmod(position, self.num_windows)
        return index if self.seed is None else int(self._order(epoch)[index])

    @lru_cache(maxsize=2)  # noqa: B019 - as _order: asked once per window of a batch
    def offset(self, epoch: int) -> int:
        """Where epoch `epoch` starts cutting windows: 0, or with `shift` a draw from (seed, epoch)."""
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.context_length)) if self.shift else 0

    def window(self, index: int, epoch: int = 0) -> np.ndarray:
        array = int(np.searchsorted(self.starts, index, side="right")) - 1
        start = (index - int(self.starts[array])) * self.context_length + self.offset(epoch)
        return self.arrays[array][start : start + self.context_length + 1]

    def batch(self, first: int, count: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (count, context_length) for global positions first .. first + count - 1."""
        positions = range(first, first + count)
        return self.tensors([self.window(self.window_index(p), p // self.num_windows) for p in positions], device)

    def pieces(self, index: int, stride: int) -> list[tuple[np.ndarray, int]]:
        """Window `index` (as epoch 0 cuts it) as sliding-window evaluation reads it: `stride` targets at a time,
        each piece the context_length + 1 tokens that end with its targets, so that a target has at least
        context_length - stride tokens before it (those of an array's first window excepted: nothing precedes
        them). (tokens, how many of its last targets to score) per piece; together they score the window's."""
        array = int(np.searchsorted(self.starts, index, side="right")) - 1
        local, length = index - int(self.starts[array]), self.context_length
        if local == 0 or stride >= length:
            return [(self.window(index), length)]
        tokens, start = self.arrays[array], local * length + self.offset(0)
        return [(tokens[end - length : end + 1], stride) for end in range(start + stride, start + length + 1, stride)]

    @staticmethod
    def tensors(rows: list[np.ndarray], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of equally long token rows, on `device`."""
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        if torch.device(device).type == "cuda":  # from pinned memory the copy need not wait for the GPU's queue
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        else:
            tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]
