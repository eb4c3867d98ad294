import math

import numpy as np
import pytest
import torch
from conftest import sample

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.evaluate import (
    SAMPLE_PROMPT,
    EvalResult,
    Evaluator,
    evaluate,
    gpt2_token_count,
    gpt2_tokens_scored,
    scored_windows,
)
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(bpe):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=32, d_model=32, n_layer=1, n_head=2)).eval()


@pytest.fixture(scope="module")
def evaluator(bpe):
    return Evaluator.from_data(sample("validation-first1000.txt"), bpe, context_length=32, batch_size=4, max_batches=3)


def test_max_batches_scores_windows_spread_over_the_data_not_the_first_ones():
    assert scored_windows(10, 2, None).tolist() == list(range(10))  # all, in order
    assert scored_windows(10, 2, 2).tolist() == [0, 2, 5, 7]
    assert scored_windows(10, 4, 3).tolist() == list(range(10))  # more asked for than there are


def test_evaluate_scores_spread_windows_and_counts_their_gpt2_tokens(bpe, model, evaluator):
    result = evaluator.evaluate(model)
    assert result.tokens == 3 * 4 * 32  # max_batches x batch_size windows of 32 predicted tokens
    # the same figures as the lower-level function, and as scoring the spread windows one by one
    token_bytes = torch.tensor(bpe.token_bytes())
    plain = evaluate(model, evaluator.windows, token_bytes, 4, 3)
    assert result.nats == pytest.approx(plain.nats, rel=1e-12) and result.text_bytes == plain.text_bytes
    windows = evaluator.windows
    indices = scored_windows(len(windows), 4, 3)
    assert indices[-1] > len(windows) // 2  # from the whole file, not its first 12 windows
    one_by_one = [model.loss(*windows.tensors([windows.window(i)], "cpu"), reduction="sum").item() for i in indices]
    assert result.nats == pytest.approx(sum(one_by_one), rel=1e-5)
    assert result.gpt2_tokens == gpt2_tokens_scored(windows, indices, bpe)
    # all windows in order: consecutive windows are counted as the one text they are, not window by window
    everything = np.arange(len(windows))
    whole = np.concatenate([windows.window(i)[1:] for i in everything])
    assert gpt2_tokens_scored(windows, everything, bpe) == gpt2_token_count(bpe, whole, Tokenizer.gpt2())
    # an untrained model is near uniform over the vocabulary
    assert abs(result.loss - math.log(bpe.vocab_size)) < 0.5
    assert result.to_record() == {"val_loss": result.loss, "val_bpb": result.bits_per_byte,
                                  "val_nats_per_gpt2_token": result.nats_per_gpt2_token}  # fmt: skip
    assert evaluator.evaluate(model).nats == result.nats  # deterministic: the windows are in order


def test_sliding_window_evaluation_scores_the_same_text_each_piece_after_the_tokens_before_it(bpe, model, evaluator):
    plain = evaluator.evaluate(model)
    windows, length, stride = evaluator.windows, 32, 8
    sliding = Evaluator(windows, bpe, batch_size=4, max_batches=3, stride=stride).evaluate(model)
    assert (sliding.tokens, sliding.text_bytes, sliding.gpt2_tokens) == (
        plain.tokens,
        plain.text_bytes,
        plain.gpt2_tokens,
    )
    # The reference, from the token stream itself: window i's targets i*32+1 .. i*32+32 in runs of 8, each run
    # predicted by the model's logits after the 32 tokens that end with it (window 0 alone has nothing before it).
    (stream,) = windows.arrays
    expected = 0.0
    indices = scored_windows(len(windows), 4, 3)
    assert indices[0] == 0
    with torch.no_grad():
        for index in indices:
            start = int(index) * length
            runs = [(start + length, length)] if index == 0 else [(start + k, stride) for k in range(8, 33, 8)]
            for end, count in runs:
                tokens = torch.from_numpy(stream[end - length : end + 1].astype(np.int64))
                logits = model(tokens[None, :-1])[0, -count:]
                expected += torch.nn.functional.cross_entropy(logits, tokens[-count:], reduction="sum").item()
    assert sliding.nats == pytest.approx(expected, rel=1e-5)
    assert sliding.nats != pytest.approx(plain.nats, rel=1e-5)  # other contexts (this model is near uniform)
    # at the full stride, the non-overlapping windows exactly
    assert Evaluator(windows, bpe, batch_size=4, max_batches=3, stride=length).evaluate(model).nats == plain.nats


def test_a_stride_must_divide_the_context(bpe, evaluator):
    for stride in (0, 5, 64):
        with pytest.raises(UserError, match=f"stride {stride} must divide the context length 32"):
            Evaluator(evaluator.windows, bpe, stride=stride)


def test_the_gpt2_count_is_taken_once(bpe, model, evaluator, monkeypatch):
    evaluator.evaluate(model)
    import gpt_tinystories.evaluate as module

    def fail(*_args):
        raise AssertionError("counted again")

    monkeypatch.setattr(module, "gpt2_tokens_scored", fail)
    assert evaluator.evaluate(model).gpt2_tokens > 0


def test_sample_continues_the_prompt_reproducibly_and_leaves_the_rng_alone(model, evaluator):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluator.sample(model, 12, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.startswith(SAMPLE_PROMPT) and len(first) > len(SAMPLE_PROMPT)
    assert evaluator.sample(model, 12, seed=7) == first
    other = evaluator.sample(model, 12, seed=7, prompt="Tom had a red ball.")
    assert other.startswith("Tom had a red ball.")


def test_eval_result_figures():
    result = EvalResult(nats=100.0, tokens=50, text_bytes=200, gpt2_tokens=40)
    assert result.loss == 2.0 and result.perplexity == pytest.approx(math.exp(2.0))
    assert result.bits_per_byte == pytest.approx(100 / math.log(2) / 200)
    assert result.nats_per_gpt2_token == 2.5
    assert EvalResult(nats=1.0, tokens=1, text_bytes=1).nats_per_gpt2_token is None
