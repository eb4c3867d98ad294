"""Story metrics, their intervals, the training n-gram index and the prompt files."""

import hashlib
import json

import numpy as np
import pytest
from conftest import sample

from gpt_tinystories.errors import UserError
from gpt_tinystories.ngram_index import NGramIndex, build, open_or_build, words
from gpt_tinystories.prompts import builtin_path, load_prompts, parse_prompts
from gpt_tinystories.story_metrics import (
    Completion,
    completion_metrics,
    distinct_n,
    name_use,
    names,
    repeated_share,
    spelling,
    summary,
)


def test_repetition_and_distinct_n():
    assert repeated_share(list("abcdabcd"), 4) == pytest.approx(1 / 5)  # "a b c d" again at the end
    assert repeated_share(list("abcde"), 4) == 0.0
    assert repeated_share(list("abc"), 4) is None
    assert distinct_n(["The cat sat.", "the cat ran"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["The cat sat.", "the cat ran"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["", "hi"], 2) is None


def test_names_kept_and_introduced():
    prompt = 'Once upon a time, there was a girl named Lily. Lily had a dog called Max. She said, "Hi'
    assert names(prompt) == {"Lily", "Max"}  # "Once", "She" start sentences; "Lily." mid-sentence counts
    assert name_use(prompt, ' there!" Lily played with Tom and Tom was happy.') == (2, 1, 1)  # kept Lily; new Tom
    assert name_use(prompt, ' there." Then she slept.') == (2, 0, 0)
    assert name_use("I saw a cat.", " I am Sam and I like Ben.") == (0, 0, 2)  # "I" is never a name


def test_spelling_counts_words_outside_the_dictionary():
    assert spelling("The dog ran to the park.")["unknown_word_share"] == 0.0
    assert spelling("The dgo rna to the prak.")["unknown_word_share"] == pytest.approx(3 / 6)
    assert spelling("...")["unknown_word_share"] is None


def test_summary_means_over_prompts_with_bootstrap_intervals():
    completions = [Completion(p, s, "P", "x", 1, bool(p)) for p in range(4) for s in range(2)]
    records = [{"finished": c.finished, "words": 10 * c.prompt_index + c.sample} for c in completions]
    result = summary(completions, records)
    assert result["finished"]["mean"] == pytest.approx(0.75)  # prompts 1, 2, 3 finish
    assert result["words"]["mean"] == pytest.approx(np.mean([0.5, 10.5, 20.5, 30.5]))
    low, high = result["words"]["ci95"]
    assert 0.5 <= low < 15.5 < high <= 30.5  # a bootstrap of 4 prompt means stays within them
    assert summary(completions, records) == result  # seeded: the same interval every time
    same = summary(completions, [{"words": 7} for _ in completions])
    assert same["words"] == {"mean": 7.0, "ci95": [7.0, 7.0], "prompts": 4}
    undefined = summary(completions, [{"share": None} for _ in completions])
    assert undefined["share"] == {"mean": None, "ci95": None, "prompts": 0}


STORIES = [
    "Tom had a big red ball. He liked to play with it in the park every day.",
    "Sue saw a cat. The cat was sad because it lost its ball in the park.",
]


def write_stories(path, stories):
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    return path


def test_index_finds_exactly_the_training_8grams(tmp_path):
    data = write_stories(tmp_path / "train.txt", STORIES)
    index = build(data, tmp_path / "index", n=8, progress=False)
    expected = {tuple(w[i : i + 8]) for s in STORIES for w in [words(s)] for i in range(len(w) - 7)}
    assert len(index) == len(expected) == index.meta["distinct_ngrams"] == 10 + 9
    copied = index.copying("He liked to play with it in the park every day and night.")
    assert (copied.ngrams, copied.in_training, copied.longest_span) == (6, 4, 11)  # "he liked ... day": 11 words
    # an 8-gram that crosses two stories is in neither
    assert index.copying("play with it in the park every day. Sue saw a cat.").in_training == 1
    assert index.copying("A dragon flew over the moon and sang a song.").longest_span == 0
    assert index.copying("Too short.").share is None
    assert NGramIndex(tmp_path / "index").copying(STORIES[1]).share == 1.0  # reopened from disk


def test_index_is_the_same_whatever_the_buffer(tmp_path):
    data = sample("train-head.txt")
    big = build(data, tmp_path / "big", n=8, progress=False)
    small = build(data, tmp_path / "small", n=8, buffer_ngrams=1000, progress=False)  # hundreds of flushes
    assert np.array_equal(np.asarray(big.hashes), np.asarray(small.hashes))
    assert np.all(np.diff(np.asarray(big.hashes).astype(np.float64)) >= 0)  # one sorted file
    assert big.meta["ngrams"] > len(big) > 300_000  # repeated n-grams stored once
    story = next(s for s in data.read_text().split("<|endoftext|>")[5:] if len(s) > 200)
    assert big.copying(story).share == 1.0 and big.copying(story).longest_span == len(words(story))


def test_index_is_built_once_and_cached(tmp_path, monkeypatch):
    data = write_stories(tmp_path / "train.txt", STORIES)
    first = open_or_build(data, progress=False)
    assert open_or_build(data, progress=False).meta == first.meta  # the same folder, not rebuilt
    write_stories(data, STORIES[:1])  # the data changed: a new index
    assert len(open_or_build(data, progress=False)) == 10
    (tmp_path / "nope").mkdir()
    with pytest.raises(UserError, match="not an n-gram index"):
        NGramIndex(tmp_path / "nope")


def test_completion_metrics_together(tmp_path):
    index = build(write_stories(tmp_path / "t.txt", STORIES), tmp_path / "i", progress=False)
    text = " He liked to play with it in the park every day."
    c = Completion(0, 0, "One day, Tom had a big red ball.", text, 15, True)
    m = completion_metrics(c, index, spelling)
    assert m == {"finished": True, "words": 11, "repeated_4gram_share": 0.0, "prompt_names": 1,
                 "prompt_names_kept": 0, "new_names": 0, "copied_8gram_share": 1.0, "longest_copied_span": 11,
                 "unknown_word_share": 0.0}  # fmt: skip


def test_the_shipped_prompts_are_the_authors_file():
    prompts, name = load_prompts()
    shared = sample("evaluation-prompts.yaml")
    assert builtin_path().read_bytes() == shared.read_bytes()
    assert hashlib.sha256(builtin_path().read_bytes()).hexdigest().startswith("a915216be551")
    assert name == "tinystories-44" and len(prompts) == 44
    assert prompts[3].endswith("his mum's words \"")  # kept exactly: some end in an open quote
    assert "CDLA-Sharing-1.0" in (builtin_path().parent / "NOTICE.md").read_text()


def test_prompt_files_and_their_mistakes(tmp_path):
    assert parse_prompts('["A cat.", "A dog."]', "p.json") == ["A cat.", "A dog."]
    assert parse_prompts("- A cat.\n- |-\n  Two\n  lines\n", "p.yaml") == ["A cat.", "Two\nlines"]
    assert parse_prompts("A cat.\n\nA dog.\n", "p.txt") == ["A cat.", "A dog."]
    mistakes = {
        ("p.json", '{"a": 1}'): "holds a dict, not a list of prompts",
        ("p.json", '["ok", 3]'): "item 2 is a int, not a string",
        ("p.json", "[1,"): "is not valid JSON",
        ("p.yaml", "- a\n b: [\n"): "is not valid YAML",
        ("p.yaml", "[]"): "holds no prompts",
        ("p.yaml", ""): "holds no prompts",
        ("p.txt", "\n \n"): "holds no prompts",
        ("p.yaml", '- "  "'): "item 1 is an empty prompt",
    }
    for (name, text), message in mistakes.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            load_prompts(tmp_path / name)
    with pytest.raises(UserError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.yaml")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        load_prompts(tmp_path / "bin.txt")
    assert json.loads(json.dumps(load_prompts(None)[0]))[0].startswith("Once upon a time, there lived a bunny")
