"""The decode engine: continuous batching over KV-cache slots, a static-shape (compilable) decode step."""

import pytest
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.engine import Engine, Sampling
from gpt_tinystories.generate import generate
from gpt_tinystories.model import GPT

CONFIG = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=4, context_length=48)
GREEDY = Sampling(temperature=0)


def varied(model):
    """Random weights scaled up: greedy decoding then wanders over the vocabulary instead of repeating a token."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return varied(GPT(CONFIG))


def recomputed_greedy(model, prompt, steps):
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens[-model.config.context_length :]]))[0, -1].argmax()))
    return tokens[len(prompt) :]


def run(engine):
    """Step the engine until it is idle: {sequence id: tokens}."""
    out = {}
    while engine.busy:
        for sequence, token in engine.step():
            out.setdefault(sequence.id, []).append(token)
    return out


def test_greedy_tokens_equal_full_recomputation_as_sequences_come_and_go(model):
    torch.manual_seed(1)
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 2, 30, 9)]
    engine = Engine(model, max_batch=2, prefill_chunk=7)  # fewer slots than sequences; long prompts in chunks
    sequences = [engine.add(p, 12, GREEDY) for p in prompts[:3]]
    first = engine.step()  # the first prompt (5 tokens) and the first 2 of the second fill this step's chunk
    assert [s.slot for s in sequences] == [0, 1, None] and len(engine.waiting) == 1
    assert [(s.id, s.filled) for s, _ in first] == [(sequences[0].id, 5)] and sequences[1].filled == 2
    sequences += [engine.add(p, 12, GREEDY) for p in prompts[3:]]
    run(engine)
    for sequence, prompt in zip(sequences, prompts, strict=True):
        assert sequence.generated == recomputed_greedy(model, prompt, 12)
        assert sequence.finish_reason == "length"
    assert engine.running == {} and sorted(engine._free) == [0, 1]


def test_sequences_slide_past_the_context_like_full_recomputation_of_the_last_half(model):
    engine = Engine(model, max_batch=3)
    long = engine.add(list(range(1, 41)), 30, GREEDY)  # 40 + 30 > 48 positions: slides to the last 24 tokens
    out = run(engine)[long.id]
    assert len(out) == 30
    tokens, start = list(range(1, 41)), 0
    for _ in range(30):  # once the cache is full, it is rebuilt from the most recent half-context
        if len(tokens) - start > 48:
            start = len(tokens) - 48 // 2
        tokens.append(int(model(torch.tensor([tokens[start:]]))[0, -1].argmax()))
    assert out == tokens[40:]


def test_a_seeded_sequence_writes_the_same_tokens_alone_or_beside_others(model):
    settings = [Sampling(1.0), Sampling(0.7, top_k=20), Sampling(1.2, top_p=0.9), GREEDY, Sampling(0.9, 40, 0.8)]

    def alone(index):
        engine = Engine(model, max_batch=8)
        sequence = engine.add([7, 8, 9], 40, settings[index], generator=torch.Generator().manual_seed(index))
        return run(engine)[sequence.id]

    engine = Engine(model, max_batch=8)
    together = {}
    for index, sampling in enumerate(settings):  # each joins a step after the one before, in another slot
        sequence = engine.add([7, 8, 9], 40, sampling, generator=torch.Generator().manual_seed(index))
        together[sequence.id] = index
        for s, token in engine.step():
            together.setdefault(("out", together[s.id]), []).append(token)
    for s, token in [pair for _ in range(60) for pair in engine.step()]:
        together.setdefault(("out", together[s.id]), []).append(token)
    for index in range(len(settings)):
        assert together[("out", index)] == alone(index), index
    assert together[("out", 0)] != together[("out", 1)]


def test_cancelled_and_finished_sequences_free_their_slot_within_one_step(model):
    engine = Engine(model, max_batch=2)
    first, second = engine.add([1, 2], 100, GREEDY), engine.add([3, 4], 3, GREEDY)
    third = engine.add([5, 6], 5, GREEDY)
    engine.step()
    assert (first.slot, second.slot, third.slot) == (0, 1, None)
    engine.cancel(first)
    engine.step()  # the cancel frees slot 0 and the waiting sequence takes it in the same step
    assert first.finish_reason == "cancelled" and third.slot == 0 and len(first.generated) == 1
    engine.step()
    assert second.finish_reason == "length" and 1 not in engine.running  # its third token: it left at once
    run(engine)
    assert third.generated == recomputed_greedy(model, [5, 6], 5)


def test_eos_ends_a_sequence(model):
    free = recomputed_greedy(model, [5, 6, 7], 10)
    engine = Engine(model, max_batch=2)
    sequence = engine.add([5, 6, 7], 10, GREEDY, eos_id=free[3])
    run(engine)
    assert sequence.generated == free[: free.index(free[3]) + 1] and sequence.finish_reason == "eos"


class Faulty(torch.nn.Module):
    """A model that raises whenever its input holds `poison`: a request that breaks inside the engine."""

    def __init__(self, model, poison):
        super().__init__()
        self.inner, self.poison, self.config, self.wte = model, poison, model.config, model.wte

    def forward(self, idx, cache=None):
        if bool((idx == self.poison).any()):
            raise RuntimeError("poisoned")
        return self.inner(idx, cache)


def test_a_sequence_that_raises_fails_alone(model):
    healthy = [[11, 12], [13, 14, 15]]
    expected = [recomputed_greedy(model, p, 15) for p in healthy]
    doomed = recomputed_greedy(model, [21, 22], 15)
    poison = next(t for t in doomed[2:] if all(t not in e for e in expected) and t not in (11, 12, 13, 14, 15))
    engine = Engine(Faulty(model, poison), max_batch=4)
    engine.isolate_errors = True
    sequences = [
        engine.add(healthy[0], 15, GREEDY),
        engine.add([21, 22], 15, GREEDY),  # fails while decoding
        engine.add([poison, 1], 15, GREEDY),
        engine.add(healthy[1], 15, GREEDY),
    ]  # fails in prefill
    out = run(engine)
    assert out[sequences[0].id] == expected[0] and out[sequences[3].id] == expected[1]
    assert out[sequences[1].id][-1] is None and sequences[1].finish_reason == "error"
    assert out[sequences[1].id][:-1] == doomed[: doomed.index(poison) + 1]
    assert out[sequences[2].id] == [None] and str(sequences[2].error) == "poisoned"
    strict = Engine(Faulty(model, poison), max_batch=4)
    strict.add([poison], 3, GREEDY)
    with pytest.raises(RuntimeError, match="poisoned"):
        strict.step()


def test_local_attention_layers_decode_like_full_recomputation():
    torch.manual_seed(4)
    config = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=4, context_length=48, local_window=6,
                         local_layers=(1,))  # fmt: skip
    net = varied(GPT(config))
    (out,) = generate(net, [[3, 4, 5]], 30, GREEDY)
    assert out == recomputed_greedy(net, [3, 4, 5], 30) and len(set(out)) > 5


def test_the_compiled_step_decodes_the_same_greedy_tokens_as_eager(model):
    torch.manual_seed(5)
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (4, 9, 6)]
    eager = generate(model, prompts, 20, GREEDY)
    assert generate(model, prompts, 20, GREEDY, compile=True) == eager
    assert eager == [recomputed_greedy(model, p, 20) for p in prompts]


def test_decoding_under_bf16_autocast_runs_as_training_samples_do(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = generate(model, [[5, 6, 7]], 6, Sampling(0.8, top_k=50), generator=torch.Generator().manual_seed(0))
    assert len(out) == 6


def test_warm_up_runs_a_step_at_the_shape_it_will_be_called_with_after_eager_decoding(model):
    """Eager steps read the cache only up to the furthest row; the compiled step reads all of it. A warm-up that
    inherited an eager step's reach would compile (or record CUDA graphs for) a shape never used again."""
    engine = Engine(model, max_batch=2)
    engine.add([3, 4, 5], 4, GREEDY)
    run(engine)
    assert (engine.cache.span, engine.cache.masked) == (6, False)  # left by the last eager step
    seen = []

    def step(net, cache, tokens, positions):
        seen.append((cache.span, cache.masked))

    engine.warm_up(step)
    assert set(seen) == {(CONFIG.context_length, True)}
