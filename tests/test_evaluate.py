import math

import pytest
import torch
from conftest import sample

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.evaluate import SAMPLE_PROMPT, EvalResult, Evaluator, evaluate, gpt2_tokens_scored
from gpt_tinystories.model import GPT


@pytest.fixture(scope="module")
def model(bpe):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=32, d_model=32, n_layer=1, n_head=2)).eval()


@pytest.fixture(scope="module")
def evaluator(bpe):
    return Evaluator.from_data(sample("validation-first1000.txt"), bpe, context_length=32, batch_size=4, max_batches=3)


def test_evaluate_scores_the_first_batches_and_counts_their_gpt2_tokens(bpe, model, evaluator):
    result = evaluator.evaluate(model)
    assert result.tokens == 3 * 4 * 32  # max_batches x batch_size windows of 32 predicted tokens
    # the same figures as the lower-level function, window for window
    token_bytes = torch.tensor(bpe.token_bytes())
    plain = evaluate(model, evaluator.windows, token_bytes, 4, 3)
    assert result.nats == pytest.approx(plain.nats, rel=1e-12) and result.text_bytes == plain.text_bytes
    assert result.gpt2_tokens == gpt2_tokens_scored(plain, evaluator.windows, bpe)
    # an untrained model is near uniform over the vocabulary
    assert abs(result.loss - math.log(bpe.vocab_size)) < 0.5
    assert result.to_record() == {"val_loss": result.loss, "val_bpb": result.bits_per_byte,
                                  "val_nats_per_gpt2_token": result.nats_per_gpt2_token}  # fmt: skip
    assert evaluator.evaluate(model).nats == result.nats  # deterministic: the windows are in order


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
