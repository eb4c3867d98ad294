import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

from gpt_tinystories import data
from gpt_tinystories.data import PreparedData, TokenWindows, iter_stories, prepare
from gpt_tinystories.errors import UserError
from gpt_tinystories.tokenizer import Tokenizer


def test_txt_stories_are_split_on_eos_and_stripped():
    stories = list(iter_stories(sample("train-head.txt")))
    assert len(stories) == 2317  # 2,316 whole stories and the cut-off last one
    assert stories[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert all(s == s.strip() and "<|endoftext|>" not in s for s in stories)
    assert len(list(iter_stories(sample("validation-first1000.txt")))) == 1000
    assert len(list(iter_stories(sample("fixture-5-stories.txt")))) == 5


def test_prepared_tokens_are_each_story_then_eos(gpt2, tmp_path):
    stories = list(iter_stories(sample("train-head.txt")))
    prepared = prepare(sample("train-head.txt"), gpt2, out=tmp_path / "train", progress=False)
    expected = sum(len(ids) + 1 for ids in gpt2.encode_batch(stories))
    assert prepared.meta["tokens"] == expected
    assert prepared.meta["stories"] == 2317
    assert prepared.meta["text_bytes"] == sum(len(s.encode()) for s in stories)
    assert prepared.meta["tokenizer"]["hash"] == gpt2.hash
    assert prepared.meta["dtype"] == "uint16"
    (shard,) = prepared.tokens()
    assert shard.dtype == np.uint16 and len(shard) == expected
    first = gpt2.encode(stories[0]) + [gpt2.eos_id] + gpt2.encode(stories[1]) + [gpt2.eos_id]
    assert shard[: len(first)].tolist() == first
    assert shard[-1] == gpt2.eos_id
    assert (shard == gpt2.eos_id).sum() == 2317
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["meta.json", "tokens-00000.bin"]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed into place


def test_shards_split_at_the_shard_size(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 300)
    prepared = prepare(sample("fixture-5-stories.txt"), bpe, out=tmp_path / "p", progress=False)
    sizes = [s["tokens"] for s in prepared.meta["shards"]]
    assert all(size == 300 for size in sizes[:-1]) and sum(sizes) == prepared.num_tokens > 600
    stories = list(iter_stories(sample("fixture-5-stories.txt")))
    expected = [t for ids in bpe.encode_batch(stories) for t in [*ids, bpe.eos_id]]
    assert np.concatenate(prepared.tokens()).tolist() == expected


def test_large_vocabularies_use_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000, "[UNK]": 70_001}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.add_special_tokens(["<|endoftext|>"])
    big = Tokenizer(backend, "wordlevel")
    (tmp_path / "s.txt").write_text("w69999 w1<|endoftext|>w2")
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    prepared = prepare(tmp_path / "s.txt", big, out=tmp_path / "p", progress=False)
    assert prepared.meta["dtype"] == "uint32"
    assert prepared.tokens()[0].tolist() == [69999, 1, 70000, 2, 70000]


def test_prepare_is_cached_by_source_and_tokenizer(gpt2, bpe, tmp_path):
    source = tmp_path / "stories.txt"
    source.write_text((sample("fixture-5-stories.txt")).read_text())
    first = prepare(source, gpt2, progress=False)
    assert not first.from_cache and str(first.path).startswith(str(data.default_cache_dir()))
    again = prepare(source, gpt2, progress=False)
    assert again.from_cache and again.path == first.path
    other = prepare(source, bpe, progress=False)
    assert other.path != first.path and not other.from_cache
    source.write_text(source.read_text() + "\n<|endoftext|>\nOne more story.")
    changed = prepare(source, gpt2, progress=False)
    assert not changed.from_cache and changed.meta["stories"] == 6


def test_jsonl_parquet_and_folders_give_the_same_tokens_as_txt(bpe, tmp_path):
    stories = list(iter_stories(sample("fixture-5-stories.txt")))
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(stories[:2])))
    pq.write_table(pa.table({"text": stories[2:]}), folder / "nested" / "b.parquet")
    (folder / "notes.md").write_text("ignored: not a supported suffix")
    assert list(iter_stories(folder / "a.jsonl")) == stories[:2]
    assert list(iter_stories(folder / "nested" / "b.parquet")) == stories[2:]
    assert list(iter_stories(folder)) == stories
    from_folder = prepare(folder, bpe, out=tmp_path / "f", progress=False)
    from_txt = prepare(sample("fixture-5-stories.txt"), bpe, out=tmp_path / "t", progress=False)
    assert from_folder.tokens()[0].tolist() == from_txt.tokens()[0].tolist()


def test_hub_datasets_load_through_datasets_load_dataset(gpt2, monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(name, split):  # the real call, minus the network
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["  A short story. ", "", "Another one."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_stories("someone/stories", split="validation")) == ["A short story.", "Another one."]
    prepared = prepare("someone/stories", gpt2, split="validation", progress=False)
    assert prepared.meta["stories"] == 2 and prepared.path.name.startswith("validation-")
    assert calls == [("someone/stories", "validation")] * 2


def test_an_unreachable_hub_asks_for_local_files(gpt2):
    # conftest sets HF_HUB_OFFLINE=1, so datasets answers at once without touching the network.
    with pytest.raises(UserError, match="pass local files"):
        prepare("roneneldan/TinyStories", gpt2, progress=False)


BAD_SOURCES = {
    "missing.txt": (None, "data not found"),
    "empty.txt": (b"", "no stories found"),
    "only-eos.txt": (b"\n<|endoftext|>\n  \n", "no stories found"),
    "binary.txt": (b"Once upon\x00\x01\x02", "looks binary"),
    "latin1.txt": ("Once upon a café au lait".encode("latin-1"), r"not valid UTF-8 \(byte offset 15\)"),
    "cut.txt": ("Once upon a café".encode()[:-1], "not valid UTF-8: it ends inside a character"),
    "bad.jsonl": (b'{"text": "ok"}\n{"story": "no text"}\n', "bad.jsonl:2 has no string field"),
    "broken.jsonl": (b'{"text": "ok"}\nnot json\n', "broken.jsonl:2 is not a JSON object"),
    "table.parquet": (b"PAR1 this is not parquet", "cannot read parquet"),
    "story.csv": (b"text\nOnce", "unsupported data file"),
}


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_bad_sources_raise_one_clear_error_and_write_nothing(name, gpt2, tmp_path):
    content, message = BAD_SOURCES[name]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare(tmp_path / name, gpt2, out=out, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ([name] if content is not None else [])


def test_a_folder_without_stories_is_an_error(gpt2, tmp_path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(UserError, match="holds no .txt, .jsonl, .parquet file"):
        prepare(tmp_path, gpt2, progress=False)
    os.mkfifo(tmp_path / "pipe")  # neither a file nor a folder, as /dev/null or <(zcat stories.txt.gz)
    with pytest.raises(UserError, match="pipe is neither a file nor a folder; point --data at a .txt, .jsonl"):
        prepare(tmp_path / "pipe", gpt2, progress=False)


def test_prepare_refuses_to_overwrite_another_prepared_folder(gpt2, bpe, tmp_path):
    prepare(sample("fixture-5-stories.txt"), gpt2, out=tmp_path / "p", progress=False)
    before = (tmp_path / "p" / "tokens-00000.bin").read_bytes()
    with pytest.raises(UserError, match="already holds other prepared data"):
        prepare(sample("fixture-5-stories.txt"), bpe, out=tmp_path / "p", progress=False)
    assert (tmp_path / "p" / "tokens-00000.bin").read_bytes() == before
    with pytest.raises(UserError, match="prepare the data again"):
        PreparedData.open(tmp_path / "p").check_tokenizer(bpe)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bpe):
    return prepare(sample("validation-first1000.txt"), bpe, out=tmp_path_factory.mktemp("val") / "p", progress=False)


def test_windows_are_a_pure_function_of_seed_and_position(prepared):
    windows = TokenWindows(prepared.tokens(), context_length=64, seed=7)
    x, y = windows.batch(100, 8)
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # A fresh sampler (a resumed run) and two ranks' slices see the very same rows.
    again = TokenWindows(prepared.tokens(), context_length=64, seed=7)
    halves = [again.batch(100, 4), again.batch(104, 4)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert not torch.equal(TokenWindows(prepared.tokens(), context_length=64, seed=8).batch(100, 8)[0], x)


def test_each_epoch_visits_every_window_once_in_a_new_order(prepared):
    windows = TokenWindows(prepared.tokens(), context_length=128, seed=0)
    n = len(windows)
    assert n == (prepared.num_tokens - 1) // 128
    epoch0 = [windows.window_index(p) for p in range(n)]
    epoch1 = [windows.window_index(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    tokens = prepared.tokens()[0]
    in_order = TokenWindows(prepared.tokens(), context_length=128, seed=None)
    x, y = in_order.batch(3, 1)
    assert x[0].tolist() == tokens[3 * 128 : 4 * 128].tolist() and y[0, -1] == tokens[4 * 128]


def test_shifted_windows_cut_each_epoch_at_its_own_offset(prepared):
    (tokens,) = prepared.tokens()
    windows = TokenWindows(prepared.tokens(), context_length=128, seed=0, shift=True)
    n = len(windows)
    assert n == (prepared.num_tokens - 128) // 128  # 127 tokens spare for the largest offset
    offsets = [windows.offset(epoch) for epoch in range(8)]
    assert all(0 <= o < 128 for o in offsets) and len(set(offsets)) > 1
    for epoch in (0, 3):  # an epoch's rows: its windows in its own order, cut from its offset on
        x, y = windows.batch(epoch * n, n)
        for i in range(n):
            start = offsets[epoch] + 128 * windows.window_index(epoch * n + i)
            assert x[i].tolist() == tokens[start : start + 128].tolist() and y[i, -1] == tokens[start + 128]
    # A pure function of (seed, position) still: a resumed run sees the same rows; evaluation order never shifts.
    again = TokenWindows(prepared.tokens(), context_length=128, seed=0, shift=True)
    assert torch.equal(again.batch(3 * n + 5, 4)[0], windows.batch(3 * n + 5, 4)[0])
    assert TokenWindows(prepared.tokens(), context_length=128, seed=None, shift=True).offset(5) == 0


def test_pieces_score_a_window_a_stride_at_a_time_after_the_tokens_before_it():
    arrays = [np.arange(100), np.arange(1000, 1030)]
    windows = TokenWindows(arrays, context_length=10, seed=None)
    assert len(windows) == 9 + 2
    # window 3 of the first array: targets 31..40, read 5 at a time, each piece the 11 tokens ending with them
    assert [(tokens.tolist(), scored) for tokens, scored in windows.pieces(3, 5)] == [
        (list(range(25, 36)), 5),
        (list(range(30, 41)), 5),
    ]
    pieces = windows.pieces(8, 2)
    assert [tokens[-scored:].tolist() for tokens, scored in pieces] == [[81 + 2 * k, 82 + 2 * k] for k in range(5)]
    assert all(len(tokens) == 11 for tokens, _ in pieces)
    # an array's first window has nothing before it: scored whole, as is every window at the full stride
    for index in (0, 9):
        assert [(tokens.tolist(), scored) for tokens, scored in windows.pieces(index, 5)] == [
            (windows.window(index).tolist(), 10)
        ]
    assert [(tokens.tolist(), scored) for tokens, scored in windows.pieces(10, 10)] == [(list(range(1010, 1021)), 10)]


def test_holdout_cuts_at_a_story_boundary(prepared, bpe, monkeypatch, tmp_path):
    head, tail = prepared.holdout(0.1)
    (stream,) = prepared.tokens()
    assert np.concatenate(head + tail).tolist() == stream.tolist()
    assert head[-1][-1] == bpe.eos_id and sum(map(len, tail)) == pytest.approx(0.1 * len(stream), rel=0.05)
    monkeypatch.setattr(data, "SHARD_TOKENS", 10_000)  # across shards too
    sharded = prepare(sample("validation-first1000.txt"), bpe, cache_dir=tmp_path, progress=False)  # not cached
    head2, tail2 = sharded.holdout(0.1)
    assert np.concatenate(head2).tolist() == np.concatenate(head).tolist() and len(sharded.tokens()) > 10


def test_too_little_data_for_one_window_is_an_error(prepared):
    with pytest.raises(UserError, match="fewer than one window"):
        TokenWindows(prepared.tokens(), context_length=prepared.num_tokens)
    with pytest.raises(UserError, match=r"and the \d+ that shift_windows keeps spare; use a smaller context_length"):
        TokenWindows(prepared.tokens(), context_length=prepared.num_tokens // 2 + 1, shift=True)
    assert len(TokenWindows(prepared.tokens(), context_length=prepared.num_tokens // 2 + 1)) == 1
