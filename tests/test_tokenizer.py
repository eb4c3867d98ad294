import pytest
from conftest import SAMPLE_FILES, sample

from gpt_tinystories.data import iter_stories
from gpt_tinystories.errors import UserError
from gpt_tinystories.tokenizer import Tokenizer


def test_gpt2_is_the_exact_gpt2_bpe(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    # Known GPT-2 ids (as tiktoken's "gpt2" gives them): leading space, contraction, unicode, EOS text.
    assert gpt2.encode(" Once upon a time") == [4874, 2402, 257, 640]
    assert gpt2.encode("Lily's dog") == [43, 813, 338, 3290]
    assert gpt2.encode("café") == [66, 1878, 2634]
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.encode_batch(["Hello world", "Hello"]) == [[15496, 995], [15496]]


@pytest.mark.parametrize("name", SAMPLE_FILES)
@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_decode_encode_round_trips_every_story(name, kind, request):
    tokenizer = request.getfixturevalue(kind)
    stories = list(iter_stories(sample(name)))
    assert stories
    for story, ids in zip(stories, tokenizer.encode_batch(stories), strict=True):
        assert tokenizer.decode(ids) == story


def test_trained_bpe_has_eos_and_the_asked_size(bpe):
    assert bpe.vocab_size == 4096
    assert bpe.eos_id == 0
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    # Trained on TinyStories, it spends its merges on the words that matter there.
    assert len(bpe.encode("Once upon a time, there was a little girl named Lily.")) <= 14


def test_saved_and_reloaded_tokenizers_give_identical_ids_and_hash(tmp_path, bpe, gpt2):
    text = list(iter_stories(sample("fixture-5-stories.txt")))
    for tokenizer in (bpe, gpt2):
        path = tokenizer.save(tmp_path / tokenizer.name)
        assert path.name == "tokenizer.json"
        for spec in (path, path.parent):
            again = Tokenizer.load(spec)
            assert again.encode_batch(text) == tokenizer.encode_batch(text)
            assert (again.hash, again.eos_id, again.vocab_size) == (
                tokenizer.hash,
                tokenizer.eos_id,
                tokenizer.vocab_size,
            )
    assert Tokenizer.load("gpt2").hash == gpt2.hash


def test_training_is_deterministic_and_the_hash_tells_tokenizers_apart(bpe, gpt2):
    stories = list(iter_stories(sample("train-head.txt")))
    assert Tokenizer.train(stories, 4096).hash == bpe.hash
    assert Tokenizer.train(stories, 1024).hash != bpe.hash
    assert bpe.hash != gpt2.hash


def test_bad_tokenizer_files_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(["a story"], 100)


def test_a_tokenizer_smaller_than_asked_is_noted(capsys):
    tokenizer = Tokenizer.train(["a story, a story."], 300)
    lines = capsys.readouterr().err.splitlines()
    assert tokenizer.vocab_size < 300 and lines == [
        f"note: the stories gave {tokenizer.vocab_size} tokens, fewer than the 300 asked for: train the tokenizer "
        "on more text for more"
    ]
    Tokenizer.train(list(iter_stories(sample("fixture-5-stories.txt"))), 300)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_token_bytes_add_up_to_the_utf8_length_of_the_text(kind, request):
    tokenizer = request.getfixturevalue(kind)
    lengths = tokenizer.token_bytes()
    assert lengths[tokenizer.eos_id] == 0
    for story in iter_stories(sample("v2-gpt4-train-head.txt")):
        assert sum(lengths[i] for i in tokenizer.encode(story)) == len(story.encode())
