"""transformers interop, offline: export our models, import GPT-2 and GPT-Neo (the TinyStories models' shape)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import sample

transformers = pytest.importorskip("transformers")

from gpt_tinystories import load  # noqa: E402
from gpt_tinystories.checkpoint import load_model  # noqa: E402
from gpt_tinystories.config import TrainConfig  # noqa: E402
from gpt_tinystories.errors import UserError  # noqa: E402
from gpt_tinystories.generate import Sampling, generate  # noqa: E402
from gpt_tinystories.hf import export, from_transformers, load_pretrained, to_transformers  # noqa: E402
from gpt_tinystories.tokenizer import Tokenizer  # noqa: E402
from gpt_tinystories.trainer import train  # noqa: E402

STORY = "One day, a little girl named Lily found a needle in her room. She knew it was difficult to play with it."


@pytest.fixture(scope="module", params=["bpe", "gpt2"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    tokenizer = request.getfixturevalue(request.param)
    config = TrainConfig(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=str(tokenizer.save(root)),
                         d_model=32, n_layer=2, n_head=4, context_length=64, batch_size=4, tokens_per_step=256,
                         max_steps=5, eval_every=5, eval_batches=1, sample_tokens=2, precision="fp32")  # fmt: skip
    train(config, root / "run", progress=False)
    return root / "run"


def test_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    ours, tokenizer, _ = load_model(trained)
    export(ours, tokenizer, tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode(STORY)
    assert hf_tokenizer(STORY)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == STORY and hf_tokenizer.eos_token_id == tokenizer.eos_id
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, ours(torch.tensor([ids])), atol=1e-4, rtol=0)
    assert model.generation_config.eos_token_id == tokenizer.eos_id
    generator = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    text = generator("Once upon a time", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


def tinystories_1m(kind, vocab_size=50257):
    """Randomly initialised models with the shapes of roneneldan/TinyStories-1M (GPT-Neo) or its GPT-2 twin."""
    torch.manual_seed(0)
    if kind == "gpt_neo":
        config = transformers.GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=2048, hidden_size=64,
                                           num_layers=8, num_heads=16, attention_types=[[["global", "local"], 4]],
                                           window_size=256)  # fmt: skip
        return transformers.GPTNeoForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=64, n_layer=8, n_head=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_imported_models_match_transformers(kind, tmp_path, gpt2):
    theirs = tinystories_1m(kind)
    theirs.save_pretrained(tmp_path / kind)
    ours, tokenizer, _ = load_pretrained(tmp_path / kind)  # no tokenizer files: GPT-2's is used
    assert tokenizer.hash == gpt2.hash
    if kind == "gpt_neo":
        assert ours.config.attn_scale == 1.0 and ours.config.local_layers == (1, 3, 5, 7)
    ids = torch.randint(0, 50257, (2, 300), generator=torch.Generator().manual_seed(1))  # past the 256 window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    prompt = ids[:1, :250]
    with torch.inference_mode():
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                   min_new_tokens=20, do_sample=False, pad_token_id=0)  # fmt: skip
    (greedy,) = generate(ours, prompt.tolist(), 20, Sampling(temperature=0))
    assert greedy == expected[0, 250:].tolist()
    # import -> export -> import is lossless
    export(ours, tokenizer, tmp_path / "again")
    again, _, _ = load_pretrained(tmp_path / "again")
    assert again.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert type(to_transformers(again)) is type(theirs)


@pytest.mark.parametrize("tied", [True, False])
def test_rotary_gpt2_block_exports_to_gpt_neox_and_back(tied, tmp_path, bpe):
    from gpt_tinystories.config import ModelConfig
    from gpt_tinystories.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=bpe.vocab_size, d_model=64, n_layer=2, n_head=4, context_length=96,
                         position="rope", rope_theta=1000.0, tied_embeddings=tied)  # fmt: skip
    ours = GPT(config).eval()
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a mapping that drops one shows
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    export(ours, bpe, tmp_path / "neox")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "neox").eval()
    assert type(theirs).__name__ == "GPTNeoXForCausalLM" and theirs.config.tie_word_embeddings == tied
    ids = torch.tensor([[bpe.eos_id, *bpe.encode(STORY)]])
    with torch.no_grad():
        logits = ours(ids)
        assert logits.std() > 0.1  # large enough that a wrong mapping shows
        torch.testing.assert_close(theirs(ids).logits, logits, atol=1e-4, rtol=0)
    prompt = ids[:, :12]
    with torch.inference_mode():  # transformers' own KV cache and rotary offsets against ours
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                   min_new_tokens=30, do_sample=False, pad_token_id=0)  # fmt: skip
    assert generate(ours, prompt.tolist(), 30, Sampling(temperature=0))[0] == expected[0, 12:].tolist()
    again, tokenizer, _ = load_pretrained(tmp_path / "neox")  # export -> import is lossless
    assert again.config == ours.config and tokenizer.encode(STORY) == bpe.encode(STORY)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_gpt_neox_models_that_are_not_a_rotary_gpt2_block_are_refused(tmp_path):
    pythia = transformers.GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, use_parallel_residual=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.25})  # fmt: skip
    transformers.GPTNeoXForCausalLM(pythia).save_pretrained(tmp_path / "pythia")
    (tmp_path / "pythia" / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"not a GPT-2 block with rotary positions: use_parallel_residual=True "
                                        r"\(needs False\), partial_rotary_factor=0\.25 \(needs 1\.0\)$"):  # fmt: skip
        load_model(tmp_path / "pythia")


def test_generate_and_eval_run_on_an_imported_model(tmp_path):
    theirs = tinystories_1m("gpt_neo")
    theirs.save_pretrained(tmp_path / "neo")
    teller = load(tmp_path / "neo")
    assert isinstance(teller.generate("Once upon a time", max_new_tokens=5, seed=0), str)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", "eval", "--checkpoint", str(tmp_path / "neo"),
                             "--data", str(sample("fixture-5-stories.txt")), "--json", "--context-length", "128"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gpt2_tokens"] == report["tokens"] or abs(report["gpt2_tokens"] - report["tokens"]) < 5
    assert report["loss"] == pytest.approx(10.8, abs=0.5)  # ~ln(50257): random weights


def test_unsupported_architectures_and_mismatched_shapes_are_refused(tmp_path):
    llama = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="unsupported architecture 'llama'.*supported: gpt2, gpt_neo"):
        load_model(tmp_path / "llama")
    tinystories_1m("gpt2", vocab_size=100).save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(UserError, match=r"tensor transformer\.\S+ in .* has shape"):
        load_model(tmp_path / "bad")
    with pytest.raises(UserError, match="cannot load a transformers model from someone/missing-model"):
        load_model("someone/missing-model")  # HF_HUB_OFFLINE=1 (conftest): no network is touched


def test_exported_config_keeps_the_two_dropout_rates():
    from gpt_tinystories.config import ModelConfig
    from gpt_tinystories.model import GPT

    config = ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4, context_length=16, dropout=0.1,
                         attention_dropout=0.0)  # fmt: skip
    exported = to_transformers(GPT(config)).config
    assert (exported.resid_pdrop, exported.embd_pdrop, exported.attn_pdrop) == (0.1, 0.1, 0.0)


def test_gpt_neo_model_round_trips_through_our_checkpoint_format(tmp_path):
    from gpt_tinystories import checkpoint

    ours = from_transformers(tinystories_1m("gpt_neo", vocab_size=50257))
    files = {"tokenizer.json": Tokenizer.gpt2().backend.to_str()}
    checkpoint.save(
        tmp_path / "ckpt", ours.state_dict(), {"model_config": ours.config.to_dict(), "tokenizer": {}}, None, files
    )
    again, _, _ = load_model(tmp_path / "ckpt")
    assert again.config == ours.config
    ids = torch.randint(0, 50257, (1, 280))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


def test_training_continues_from_an_imported_model(tmp_path, bpe):
    def config(**overrides):
        values = dict(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=str(bpe.save(tmp_path)),
                      d_model=32, n_layer=2, n_head=4, context_length=64, batch_size=4, tokens_per_step=256,
                      max_steps=40, eval_every=40, eval_batches=2, sample_tokens=2, precision="fp32", lr=3e-3,
                      warmup_steps=5, log_every=1)  # fmt: skip
        return TrainConfig(**{**values, **overrides})

    base = train(config(), tmp_path / "base", progress=False)
    model, tokenizer, _ = load_model(tmp_path / "base")
    export(model, tokenizer, tmp_path / "exported")
    # a different preset on purpose: the shape and tokenizer come from the weights
    tuned = train(config(preset="8M", init_from=str(tmp_path / "exported"), max_steps=3, eval_every=3),
                  tmp_path / "tuned", progress=False)  # fmt: skip
    first = json.loads((tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()[0])
    fresh = json.loads((tmp_path / "base" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < fresh["loss"] - 1.0  # it starts where the imported model left off
    assert abs(tuned.val_loss - base.val_loss) < 0.3
    resolved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert resolved["model"]["d_model"] == 32 and resolved["train"]["init_from"] == str(tmp_path / "exported")
    again = train(config(preset="8M", init_from=str(tmp_path / "exported"), max_steps=3, eval_every=3),
                  tmp_path / "tuned", progress=False)  # fmt: skip
    assert again.step == 3  # a resumed init-from run rebuilds the imported shape from its checkpoint


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def test_export_command_and_its_errors(trained, tmp_path):
    code, out, err = cli("export", "--checkpoint", trained, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0 and "transformers GPT-2 model" in out, err
    code, out, err = cli("generate", "--checkpoint", tmp_path / "hf", "--prompt", "Once", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("Once"), err
    code, _, err = cli("export", "--checkpoint", trained, "--out", tmp_path / "hf")
    assert code == 2 and "exists and is not empty" in err and len(err.strip().splitlines()) == 1
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )  # fmt: skip
    ).save_pretrained(tmp_path / "llama")
    code, _, err = cli("export", "--checkpoint", tmp_path / "llama", "--out", tmp_path / "out")
    assert code == 2 and "unsupported architecture 'llama'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
