import pytest
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.generate import Sampling, Storyteller, TextStream, beam_search, generate
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import EOS

CONFIG = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=4, context_length=48)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_cached_logits_equal_full_recomputation_at_every_step(model):
    torch.manual_seed(1)
    sequence = torch.randint(0, 300, (3, 40))
    cache = model.new_cache(3, 40)
    torch.testing.assert_close(model(sequence[:, :10], cache), model(sequence[:, :10]), atol=1e-5, rtol=0)
    for end in range(11, 41):
        step = model(sequence[:, end - 1 : end], cache)[:, -1]
        torch.testing.assert_close(step, model(sequence[:, :end])[:, -1], atol=1e-5, rtol=0)


def test_left_padded_rows_decode_as_if_alone(model):
    torch.manual_seed(2)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 7)]
    together = generate(model, prompts, 20, Sampling(temperature=0))
    alone = [generate(model, [p], 20, Sampling(temperature=0))[0] for p in prompts]
    assert together == alone
    longest = 11
    cache = model.new_cache(3, 30, torch.tensor([longest - len(p) for p in prompts]))
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    alone_logits = torch.stack([model(torch.tensor([prompt]))[0, -1] for prompt in prompts])
    torch.testing.assert_close(model(padded, cache)[:, -1], alone_logits, atol=1e-5, rtol=0)


def test_greedy_is_deterministic_and_top_k_1_is_greedy(model):
    prompt = [[5, 6, 7]]
    greedy = generate(model, prompt, 25, Sampling(temperature=0))
    assert greedy == generate(model, prompt, 25, Sampling(temperature=0))
    assert generate(model, prompt, 25, Sampling(temperature=1.3, top_k=1)) == greedy
    # greedy is the argmax of full recomputation at every step
    tokens = [5, 6, 7]
    for _ in range(25):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert greedy[0] == tokens[3:]


def test_a_seed_makes_sampling_reproducible(model):
    def run(seed):
        return generate(model, [[1, 2]] * 2, 30, Sampling(1.0), generator=torch.Generator().manual_seed(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)
    first, second = run(7)
    assert first != second  # rows draw independently


def test_eos_stops_only_its_row(model):
    prompts = [[5, 6, 7], [100, 101]]
    free = generate(model, prompts, 10, Sampling(temperature=0))
    eos = free[0][2]
    assert eos not in free[1]
    stopped = generate(model, prompts, 10, Sampling(temperature=0), eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == free[1]


def test_generation_slides_past_the_context(model):
    (out,) = generate(model, [list(range(40))], 100, Sampling(temperature=0))
    assert len(out) == 100


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(Sampling(1.0, top_p=0.7).pick(logits, generator)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(Sampling(1.0, top_p=0.4).pick(logits, generator)) for _ in range(100)}
    assert draws == {0}


def test_draws_follow_the_probabilities_and_never_pick_an_excluded_token():
    # token 0 and the last token are excluded by top_k (zero probability at either end of the cumulative sum)
    probs = torch.tensor([0.001, 0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).repeat(20_000, 1)
    counts = torch.bincount(Sampling(1.0, top_k=4).pick(logits, torch.Generator().manual_seed(0)), minlength=6)
    assert counts[0] == counts[5] == 0
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) * 20_000
    assert torch.allclose(counts[1:5].float(), expected, rtol=0.15)  # at least 4.8 standard deviations


def sequence_log_prob(model, prompt, continuation):
    tokens = torch.tensor([prompt + continuation])
    log_probs = torch.log_softmax(model(tokens)[0, :-1], dim=-1)
    targets = tokens[0, 1:]
    return log_probs[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum().item()


def test_beam_search_finds_a_likelier_sequence_than_greedy(model):
    prompt = [3, 1, 4, 1, 5]
    (greedy,) = generate(model, [prompt], 12, Sampling(temperature=0))
    beams = beam_search(model, prompt, 12, num_beams=5)
    assert len(beams) == 12
    assert sequence_log_prob(model, prompt, beams) >= sequence_log_prob(model, prompt, greedy) - 1e-5
    assert beam_search(model, prompt, 12, num_beams=1) == greedy
    # a hypothesis ending in EOS is returned with its EOS
    eos = beams[3]
    ended = beam_search(model, prompt, 12, num_beams=5, eos_id=eos)
    assert ended[-1] == eos and len(ended) <= 12


def test_streamed_text_never_splits_a_character(gpt2):
    text = "Lily saw a café 🐱 and said «привет» — 你好!"
    stream = TextStream(gpt2)
    pieces = [stream.push(token) for token in gpt2.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_storyteller_streams_what_generate_returns(model, bpe):
    torch.manual_seed(3)
    teller = Storyteller(GPT(ModelConfig(vocab_size=bpe.vocab_size, d_model=32, n_layer=1, n_head=2)), bpe)
    whole = teller.generate("Once upon a time", max_new_tokens=30, seed=4)
    assert "".join(teller.stream("Once upon a time", max_new_tokens=30, seed=4)) == whole
    assert teller.generate("", max_new_tokens=5, temperature=0) == teller.generate(max_new_tokens=5, temperature=0)
    assert len(teller.generate("Hi", max_new_tokens=5, num_samples=3, seed=1)) == 3


def test_keep_eos_tells_a_story_that_ended_from_one_that_was_cut(bpe):
    torch.manual_seed(3)
    teller = Storyteller(GPT(ModelConfig(vocab_size=bpe.vocab_size, d_model=32, n_layer=1, n_head=2)), bpe)
    cut = teller.generate("Once upon a time", max_new_tokens=3, seed=4, keep_eos=True)
    assert cut and not cut.endswith(EOS) and cut == teller.generate("Once upon a time", max_new_tokens=3, seed=4)
    with torch.no_grad():  # every hidden state becomes all ones, and EOS's embedding points along it: EOS wins
        teller.model.ln_f.weight.zero_()
        teller.model.ln_f.bias.fill_(1.0)
        teller.model.wte.weight[bpe.eos_id] = 10.0
    assert teller.generate("Once upon a time", max_new_tokens=5, seed=4) == ""
    assert teller.generate("Once upon a time", max_new_tokens=5, seed=4, keep_eos=True) == EOS
    assert list(teller.stream("Once upon a time", max_new_tokens=5, seed=4, keep_eos=True)) == [EOS]
    assert list(teller.stream("Once upon a time", max_new_tokens=5, seed=4)) == []
    assert teller.beam_search("Once", max_new_tokens=5, num_beams=2, keep_eos=True) == EOS


@pytest.mark.parametrize(
    ("call", "kwargs", "message"),
    [
        ("generate", {"temperature": float("nan")}, r"temperature must be >= 0 and finite \(0 is greedy\), got nan"),
        ("generate", {"temperature": -1.0}, r"temperature must be >= 0 and finite \(0 is greedy\), got -1.0"),
        ("generate", {"top_k": 0}, "top_k must be a positive integer, got 0"),
        ("generate", {"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ("generate", {"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ("generate", {"num_samples": 0}, "num_samples must be a positive integer, got 0"),
        ("stream", {"max_new_tokens": -3}, "max_new_tokens must be a positive integer, got -3"),
        ("stream", {"top_p": float("inf")}, r"top_p must be in \(0, 1\], got inf"),
        ("beam_search", {"num_beams": 0}, "num_beams must be a positive integer, got 0"),
        ("stream", {"seed": 2**64}, rf"seed must be in \[0, 2\*\*63\), got {2**64}"),  # torch's overflow, once
        ("beam_search", {"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer, got 2.5"),
    ],
)
def test_bad_settings_from_python_raise_the_cli_s_user_errors(bpe, call, kwargs, message):
    """Each once decoded anyway (nan or a negative temperature sampled; top_p 0 was greedy; max_new_tokens 0 still
    wrote a token) or failed deep inside PyTorch (top_k 0, a negative max_new_tokens)."""
    teller = Storyteller(GPT(ModelConfig(vocab_size=bpe.vocab_size, d_model=32, n_layer=1, n_head=2)), bpe)
    with pytest.raises(UserError, match=f"^{message}$"):
        list(getattr(teller, call)("Once", **kwargs))
