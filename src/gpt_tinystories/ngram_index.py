"""A memory-bounded index of the word n-grams of training stories: does a generated story copy its training data?

Each story is lower-cased and split into words; every window of `n` consecutive words (never across stories)
is hashed to 64 bits. The index is the sorted set of distinct hashes, one file of uint64 (8 bytes per distinct
n-gram), memory-mapped at query time: a look-up is a binary search that touches ~30 pages.

Why memory stays bounded whatever the corpus size: building streams the stories, hashes them into a buffer of
`buffer_ngrams` (sorted and de-duplicated when full), and appends each buffer's hashes to one of 256 bucket
files chosen by the hash's top 8 bits. Finishing loads one bucket at a time (1/256 of the hashes), de-duplicates
it and appends it to the index; because buckets split the hash range in order, the concatenation is sorted. So
peak memory is the buffer plus one bucket plus the word vocabulary, and the rest lives on disk. With 64-bit
hashes two distinct n-grams collide with probability ~ m / 2^64 per look-up for m indexed n-grams (~1e-11 for
the full train split): negligible next to the metric's own meaning.

Words the index never saw cannot be part of a training n-gram, so look-ups map them to "absent" without hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import staging_dir
from .errors import UserError

FORMAT_VERSION = 1
HASHES, VOCAB, META = "ngrams.u64", "vocab.json", "meta.json"
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")  # applied to lower-cased text: "didn't" is one word, "--" none
_SEP = -1  # word id between stories (and of unknown words at query time): no window may hold it
_MUL = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant for the polynomial rolling hash
BUCKET_BITS = 8


def words(text: str) -> list[str]:
    """The index's words of `text`: lower-cased runs of letters and digits, apostrophes kept inside."""
    return WORD.findall(text.lower())


def window_hashes(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hash of every window of `n` ids, and whether the window is valid (holds no separator)."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    shifted = (ids.astype(np.int64) + 2).astype(np.uint64)  # separators become 1, words 2.., never 0
    h = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 on purpose
        for k in range(n):
            h = h * _MUL + shifted[k : k + count]
        h ^= h >> np.uint64(33)  # splitmix64's finaliser: spreads the bits so the top byte picks buckets evenly
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    seps = np.concatenate([[0], np.cumsum(ids == _SEP)])
    return h, seps[n:] - seps[:count] == 0


@dataclass
class Copying:
    ngrams: int  # windows of n words in the text
    in_training: int  # of them, how many occur in the training stories
    longest_span: int  # longest run of words covered by consecutive training n-grams (0: none of n or more)

    @property
    def share(self) -> float | None:
        return self.in_training / self.ngrams if self.ngrams else None


class NGramIndex:
    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        try:
            self.meta = json.loads((directory / META).read_text())
            vocab = json.loads((directory / VOCAB).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{directory} is not an n-gram index ({error}); build it again with --train-data") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{directory} is an n-gram index of another format; build it again with --train-data")
        self.directory = directory
        self.n: int = self.meta["n"]
        self.vocab = {word: index for index, word in enumerate(vocab)}
        size = (directory / HASHES).stat().st_size // 8
        self.hashes = np.memmap(directory / HASHES, np.uint64, "r", shape=(size,)) if size else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        if len(self.hashes) == 0:
            return np.zeros(len(hashes), bool)
        where = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.asarray(self.hashes[where] == hashes)

    def copying(self, text: str) -> Copying:
        """How much of `text` is made of the training stories' n-grams."""
        ids = np.array([self.vocab.get(w, _SEP) for w in words(text)], np.int64)
        hashes, valid = window_hashes(ids, self.n)
        present = valid & self.contains(hashes)
        return Copying(len(present), int(present.sum()), _longest_run(present) + self.n - 1 if present.any() else 0)


def _longest_run(mask: np.ndarray) -> int:
    """The length of the longest run of True in `mask`."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max()) if len(edges) else 0


def index_key(source: str | os.PathLike, split: str, n: int) -> str:
    """A cache key for the index of (source, split, n): it changes when a source file changes."""
    from .data import _source_fingerprint

    key = {"format": FORMAT_VERSION, "n": n, "words": WORD.pattern, "source": _source_fingerprint(source, split)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_index_dir(source: str | os.PathLike, split: str, n: int) -> Path:
    from .data import default_cache_dir

    return default_cache_dir().parent / "ngrams" / f"{split}-n{n}-{index_key(source, split, n)}"


def open_or_build(source: str | os.PathLike, split: str = "train", n: int = 8, directory: str | None = None,
                  progress: bool = True) -> NGramIndex:  # fmt: skip
    """The index of `source`, built once into `directory` (default: the cache) and reused after."""
    target = Path(directory) if directory else default_index_dir(source, split, n)
    if (target / META).is_file():
        index = NGramIndex(target)
        if index.meta.get("key") == index_key(source, split, n):
            return index
        if directory:
            raise UserError(f"{target} holds the index of other data or n; pass another --index-dir or delete it")
    return build(source, target, split=split, n=n, progress=progress)


def build(source: str | os.PathLike, out: str | os.PathLike, split: str = "train", n: int = 8,
          buffer_ngrams: int = 1 << 22, progress: bool = True) -> NGramIndex:  # fmt: skip
    """Index the word n-grams of every story of `source` into the folder `out` (written whole, then renamed)."""
    from .data import find_files, is_hub_id, iter_stories

    if n < 1:
        raise UserError(f"n-gram length must be at least 1, got {n}")
    stories = iter_stories(source, split)  # a bad source fails here, before anything is written
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = None if is_hub_id(source) else sum(p.stat().st_size for p in find_files(source))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="index n-grams", leave=False,
               disable=None if progress else True)  # fmt: skip
    try:
        with staging_dir(out) as tmp:  # the whole folder appears at once, or not at all
            (tmp / "buckets").mkdir()
            writer = _BucketWriter(tmp / "buckets", buffer_ngrams)
            counts = _hash_stories(stories, n, writer, bar)
            writer.flush()
            distinct = writer.merge(tmp / HASHES)
            shutil.rmtree(tmp / "buckets")
            if counts["stories"] == 0:
                raise UserError(f"no stories found in {source}; pass the training stories")
            (tmp / VOCAB).write_text(json.dumps(counts.pop("vocab")))
            meta = {"format": FORMAT_VERSION, "key": index_key(source, split, n), "n": n, "source": str(source),
                    "split": split, **counts, "distinct_ngrams": distinct, "bytes": distinct * 8,
                    "buffer_ngrams": buffer_ngrams, "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
            (tmp / META).write_text(json.dumps(meta, indent=2))
    finally:
        bar.close()
    return NGramIndex(out)


def _hash_stories(stories: Iterable[str], n: int, writer: _BucketWriter, bar) -> dict:
    """Stream the stories into `writer` in chunks; return the counts (and the word list) for the meta."""
    vocab: dict[str, int] = {}
    counts = {"stories": 0, "words": 0, "ngrams": 0, "text_bytes": 0}
    chunk: list[int] = []
    chunk_bytes = 0
    for story in stories:
        ids = [vocab.setdefault(w, len(vocab)) for w in words(story)]
        chunk += ids
        chunk.append(_SEP)
        size = len(story.encode())
        counts["stories"] += 1
        counts["words"] += len(ids)
        counts["text_bytes"] += size
        chunk_bytes += size
        if len(chunk) >= 1 << 20:
            counts["ngrams"] += writer.add(*window_hashes(np.array(chunk, np.int64), n))
            bar.update(chunk_bytes)
            chunk, chunk_bytes = [], 0
    counts["ngrams"] += writer.add(*window_hashes(np.array(chunk, np.int64), n))
    bar.update(chunk_bytes)
    counts["vocab"] = list(vocab)  # dicts keep insertion order: position = id
    return counts


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for uint64, done as sort + compare: ~10x faster than numpy 2's hash-based unique here."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


class _BucketWriter:
    """Hashes in, de-duplicated per buffer, out to 256 bucket files by their top byte."""

    def __init__(self, directory: Path, buffer_ngrams: int) -> None:
        self.directory, self.limit = directory, buffer_ngrams
        self.pending: list[np.ndarray] = []
        self.size = 0

    def add(self, hashes: np.ndarray, valid: np.ndarray) -> int:
        kept = hashes[valid]
        self.pending.append(kept)
        self.size += len(kept)
        if self.size >= self.limit:
            self.flush()
        return len(kept)

    def flush(self) -> None:
        if not self.pending:
            return
        hashes = _sorted_unique(np.concatenate(self.pending))  # sorted, so each bucket is one slice
        self.pending, self.size = [], 0
        edges = np.searchsorted(
            hashes >> np.uint64(64 - BUCKET_BITS), np.arange((1 << BUCKET_BITS) + 1, dtype=np.uint64)
        )
        for bucket in range(1 << BUCKET_BITS):
            part = hashes[edges[bucket] : edges[bucket + 1]]
            if len(part):
                with open(self.directory / f"{bucket:03d}", "ab") as file:
                    part.tofile(file)

    def merge(self, path: Path) -> int:
        """Concatenate the de-duplicated buckets, in order, into `path`; return the number of hashes."""
        distinct = 0
        with open(path, "wb") as out:
            for bucket in range(1 << BUCKET_BITS):
                part_file = self.directory / f"{bucket:03d}"
                if part_file.is_file():
                    part = _sorted_unique(np.fromfile(part_file, np.uint64))
                    part.tofile(out)
                    distinct += len(part)
                    part_file.unlink()
            out.flush()
            os.fsync(out.fileno())
        return distinct
