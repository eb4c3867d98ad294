"""The judge's training n-gram index: build speed, bytes per distinct n-gram, peak memory, and a projection to
the full TinyStories train split (1.92 GB of text).

    python benchmarks/ngram_index.py [--data ../shared/data/tinystories/train-head.txt] [--synthetic-mb 40 120]

1. Indexes the shared sample (2 MiB of real stories) and reports MB/s, distinct 8-grams and bytes on disk per
   distinct 8-gram, and the build's peak resident memory (a fresh process each, ru_maxrss).
2. Memory must not grow with the number of distinct n-grams (once past the buffer of 4M hashes, ~30 MB of
   text). Repeating the sample would only repeat n-grams, so it proves nothing; instead it indexes synthetic
   stories of growing size whose 8-grams are nearly all distinct (random sequences of the sample's words),
   and prints each build's memory beside its count.
3. Projects the full split: 8-gram positions = words per byte (measured on the sample) x 1.92e9 bytes, an
   upper bound on its distinct 8-grams; the index file is 8 bytes per distinct 8-gram; the build's memory is
   what step 2 measured (bounded by the buffer), and its time is the size over the sample's build speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"
FULL_SPLIT_BYTES = 1.92e9  # TinyStories-train.txt (V1), as the README of the shared sample states

_CHILD = """
import json, resource, sys, time
import gpt_tinystories.data  # imports torch: part of the baseline, not of the build
from gpt_tinystories.ngram_index import build
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, started = rss(), time.perf_counter()
index = build(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - started
print(json.dumps({**index.meta, "wall": seconds, "peak_rss_mb": rss(), "build_rss_mb": rss() - before}))
"""


def build_in_child(data: Path, out: Path) -> dict:
    """Build in a fresh process, so that its peak RSS is the build's own (plus the interpreter and numpy)."""
    result = subprocess.run([sys.executable, "-c", _CHILD, str(data), str(out)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.splitlines()[-1])


def baseline_rss() -> float:
    code = (
        "import resource, numpy, gpt_tinystories.ngram_index; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout) / 1024


def synthetic(path: Path, megabytes: float, vocabulary: list[str], seed: int) -> None:
    """Stories of 150 random words each (nearly every 8-gram distinct), separated as the official file does."""
    rng = np.random.default_rng(seed)
    words = np.array(vocabulary)
    with open(path, "w") as file:
        written = 0
        while written < megabytes * 1e6:
            story = " ".join(words[rng.integers(0, len(words), 150)]) + ".\n<|endoftext|>\n"
            file.write(story)
            written += len(story)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--synthetic-mb", type=float, nargs="*", default=[40, 120])
    args = parser.parse_args()
    from gpt_tinystories.ngram_index import NGramIndex

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = build_in_child(Path(args.data), tmp / "sample")
        disk = sum(p.stat().st_size for p in (tmp / "sample").iterdir())
        mb = real["text_bytes"] / 1e6
        print(f"sample {args.data}: {mb:.2f} MB, {real['stories']:,} stories, {real['words']:,} words")
        print(
            f"  build: {real['wall']:.2f} s ({mb / real['wall']:.2f} MB/s), peak RSS {real['peak_rss_mb']:.0f} MB, "
            f"of which {real['build_rss_mb']:.0f} MB above the process after its imports (torch included)"
        )
        print(
            f"  8-gram positions {real['ngrams']:,}, distinct {real['distinct_ngrams']:,} "
            f"({real['distinct_ngrams'] / real['ngrams']:.1%}); index file {real['bytes']:,} B = "
            f"{real['bytes'] / real['distinct_ngrams']:.1f} B per distinct 8-gram; with the word list "
            f"{disk / real['distinct_ngrams']:.2f} B"
        )
        vocabulary = list(NGramIndex(tmp / "sample").vocab)
        print("synthetic stories of random sample words (nearly all 8-grams distinct), fresh process each:")
        rows = []
        for size in args.synthetic_mb:
            synthetic(tmp / f"syn-{size}.txt", size, vocabulary, seed=int(size))
            stats = build_in_child(tmp / f"syn-{size}.txt", tmp / f"syn-{size}")
            (tmp / f"syn-{size}.txt").unlink()
            rows.append(stats)
            print(
                f"  {stats['text_bytes'] / 1e6:6.1f} MB: {stats['distinct_ngrams']:>11,} distinct 8-grams, "
                f"index {stats['bytes'] / 1e6:7.1f} MB, build memory {stats['build_rss_mb']:4.0f} MB "
                f"(peak RSS {stats['peak_rss_mb']:.0f} MB), "
                f"{stats['text_bytes'] / 1e6 / stats['wall']:.2f} MB/s"
            )
        if len(rows) > 1:
            growth = rows[-1]["distinct_ngrams"] / rows[0]["distinct_ngrams"]
            memory = rows[-1]["build_rss_mb"] / rows[0]["build_rss_mb"]
            print(f"  {growth:.1f}x the distinct 8-grams: build memory x{memory:.2f}")
        words_per_byte = real["words"] / real["text_bytes"]
        positions = words_per_byte * FULL_SPLIT_BYTES
        peak = max([real["build_rss_mb"], *(r["build_rss_mb"] for r in rows)])
        print(
            f"projection for the full train split ({FULL_SPLIT_BYTES / 1e9:.2f} GB): {words_per_byte:.3f} words/byte "
            f"-> <= {positions / 1e6:,.0f}M distinct 8-grams -> index file <= {positions * 8 / 1e9:.1f} GB on disk "
            f"(memory-mapped at query time, not loaded); build memory ~{peak:.0f} MB above the imports, "
            "plus the word list; "
            f"build time ~{FULL_SPLIT_BYTES / 1e6 / (mb / real['wall']) / 60:.0f} min at the sample's speed"
        )


if __name__ == "__main__":
    main()
