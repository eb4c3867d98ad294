"""Export to GGUF and ONNX, checked by the runtimes themselves: llama.cpp (llama-cpp-python) and onnxruntime.

llama.cpp is built from source by `pip install llama-cpp-python` (minutes). Without it the GGUF tests skip
with the reason, unless GPT_TINYSTORIES_REQUIRE_LLAMA_CPP=1 (CI sets it), which makes them fail instead.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt_tinystories import checkpoint
from gpt_tinystories.config import ModelConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.exports import export
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import TOKENIZER_FILE

STORY = "One day, a little girl named Lily found a needle in her room. She knew it was difficult to play with it."
REQUIRE_LLAMA_CPP = os.environ.get("GPT_TINYSTORIES_REQUIRE_LLAMA_CPP") == "1"
LLAMA = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 2}
NEOX = {"position": "rope", "rope_theta": 1000.0}  # a GPT-2 block with rotary positions


def tiny(vocab_size: int, **variant) -> GPT:
    """A small random model with peaked predictions (greedy picks by clear margins, so that two correct
    implementations agree on every token) and non-trivial biases and norm weights (so that each is checked)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, d_model=64, n_layer=2, n_head=4, context_length=64, **variant))
    with torch.no_grad():
        model.wte.weight.mul_(25)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif "ln" in name or "norm" in name:
                parameter.normal_(1.0, 0.1)
    return model.eval()


def save(directory, model, tokenizer):
    meta = {"step": 1, "tokens": 0, "val_loss": None, "model_config": model.config.to_dict(),
            "train_config": {"preset": "1M"},
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "file": TOKENIZER_FILE}}  # fmt: skip
    return checkpoint.save(directory, model.state_dict(), meta, None, {TOKENIZER_FILE: tokenizer.backend.to_str()})


def ours_greedy(model, prompt, new_tokens):
    return generate(model, [prompt], new_tokens, Sampling(temperature=0))[0]


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "gpt_tinystories", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return result.returncode, result.stdout, result.stderr


# -- GGUF / llama.cpp ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        reason = f"llama-cpp-python is not installed ({error}); pip install llama-cpp-python builds llama.cpp"
        if REQUIRE_LLAMA_CPP:
            pytest.fail(f"llama.cpp test required (GPT_TINYSTORIES_REQUIRE_LLAMA_CPP=1) but {reason}")
        pytest.skip(reason)
    # On a CPU with AMX llama.cpp (as llama-cpp-python 0.3.36 builds it) repacks q8_0 matrices for AMX, and that
    # path segfaulted in its first decode at every width tried (an Intel Xeon with amx_int8; llama.cpp issue
    # #20824), taking the test worker down with it. The tests check our files, not llama.cpp's repacking: they
    # load them into its plain CPU buffers, as its `--no-repack` does.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
        yield llama_cpp


def llama_greedy(llama_cpp, path, prompt, new_tokens):
    """llama.cpp's own greedy continuation (argmax of its logits at each step) and its logits for the prompt."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False)
    llm.eval(prompt)
    prompt_logits = np.array(llm.scores[: len(prompt)])
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens, prompt_logits, llm


@pytest.mark.parametrize("kind", ["gpt2", "gptneox", "llama"])
def test_llama_cpp_runs_the_gguf_export_like_ours(llama_cpp, bpe, tmp_path, kind):
    model = tiny(bpe.vocab_size, **{"gpt2": {}, "gptneox": NEOX, "llama": LLAMA}[kind])
    prompt = [bpe.eos_id, *bpe.encode(STORY)][:20]
    expected = ours_greedy(model, prompt, 30)
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0].numpy()
    for outtype in ("f32", "f16", "q8_0"):
        path = export(model, bpe, tmp_path / f"{kind}-{outtype}.gguf", "gguf", outtype)
        tokens, logits, llm = llama_greedy(llama_cpp, path, prompt, 30)
        error = np.abs(logits - our_logits).max() / np.abs(our_logits).max()
        if outtype == "f32":
            assert tokens == expected, (kind, outtype)
            assert error < 1e-4, (kind, outtype, error)
            # the tokenizer travels in the file: llama.cpp splits text into our ids and back
            assert llm.tokenize(STORY.encode(), add_bos=False, special=False) == bpe.encode(STORY)
            assert llm.detokenize(bpe.encode(STORY)).decode() == STORY
            assert llm.token_eos() == bpe.eos_id
        else:  # lossy types: close logits, mostly the same picks
            assert error < (1e-2 if outtype == "f16" else 3e-2), (kind, outtype, error)
            assert sum(a == b for a, b in zip(tokens, expected, strict=True)) >= 24, (kind, outtype)
    sizes = {t: (tmp_path / f"{kind}-{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_gguf_tokenizer_of_gpt2_loads_in_llama_cpp(llama_cpp, gpt2, tmp_path):
    model = GPT(ModelConfig(vocab_size=gpt2.vocab_size, d_model=32, n_layer=1, n_head=2, context_length=64))
    path = export(model, gpt2, tmp_path / "gpt2.gguf", "gguf", "q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    text = STORY + " Ünïcödé, 123 dollars!\n\nThe end."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == gpt2.encode(text)
    assert llm.token_eos() == gpt2.eos_id == 50256


# -- ONNX / onnxruntime ----------------------------------------------------------------------------------


def ort_session(folder):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def ort_step(session, config, ids, mask, positions, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(config.n_layer):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    logits, *present = session.run(None, feeds)
    return logits, present


def ort_greedy(session, config, prompt, new_tokens):
    """A greedy decode loop in onnxruntime: prefill on an empty past, then one token at a time."""
    empty = np.zeros((1, config.kv_heads, 0, config.head_size), dtype=np.float32)
    past = [empty] * (2 * config.n_layer)
    ids = np.array([prompt], dtype=np.int64)
    tokens, first_logits = [], None
    for _ in range(new_tokens):
        length = past[0].shape[2]
        positions = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
        mask = np.ones((1, length + ids.shape[1]), dtype=np.int64)
        logits, past = ort_step(session, config, ids, mask, positions, past)
        first_logits = logits if first_logits is None else first_logits
        tokens.append(int(logits[0, -1].argmax()))
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens, first_logits


@pytest.fixture(scope="module")
def onnx_models(bpe, tmp_path_factory):
    """A GPT-2-shaped model exported by the command, and a Llama-shaped one with QK-norm (a variant transformers
    has no class for) by the Python API: each export takes a while."""
    root = tmp_path_factory.mktemp("onnx")
    gpt2, llama = tiny(bpe.vocab_size), tiny(bpe.vocab_size, **LLAMA, qk_norm=True)
    code, out, err = cli("export", "--checkpoint", save(root / "ckpt", gpt2, bpe), "--format", "onnx", "--out",
                         root / "gpt2")  # fmt: skip
    assert code == 0 and out.strip().endswith(f"as an ONNX model with a KV cache to {root / 'gpt2'}"), err
    assert not err.strip(), err  # the exporter's own chatter stays hidden
    return {"gpt2": (gpt2, root / "gpt2"), "llama": (llama, export(llama, bpe, root / "llama", "onnx"))}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_onnxruntime_runs_the_onnx_export_like_ours(onnx_models, bpe, kind):
    model, folder = onnx_models[kind]
    assert {p.name for p in folder.iterdir()} == {"model.onnx", "tokenizer.json", "genai_config.json",
                                                  "tokenizer_config.json"}  # fmt: skip
    session = ort_session(folder)
    names = [i.name for i in session.get_inputs()]
    assert names[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                         "past_key_values.0.value"]  # fmt: skip
    assert len(names) == 3 + 2 * model.config.n_layer
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    prompt = [bpe.eos_id, *bpe.encode(STORY)][:16]
    tokens, logits = ort_greedy(session, model.config, prompt, 20)
    with torch.no_grad():
        np.testing.assert_allclose(logits[0], model(torch.tensor([prompt]))[0].numpy(), atol=1e-4, rtol=0)
    assert tokens == ours_greedy(model, prompt, 20)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_onnxruntime_genai_loads_the_export_folder_and_decodes_our_tokens(onnx_models, bpe, kind):
    """onnxruntime-genai reads the folder as it is (genai_config.json, tokenizer files): its tokenizer gives our
    ids, its default search is greedy, and its tokens and every step's logits are ours (the tiny model repeats
    itself, so the logits of each step are what checks the KV cache)."""
    import onnxruntime_genai as og

    model, folder = onnx_models[kind]
    runtime = og.Model(str(folder))
    assert list(og.Tokenizer(runtime).encode(STORY)) == bpe.encode(STORY)
    prompt = [bpe.eos_id, *bpe.encode(STORY)][:16]
    params = og.GeneratorParams(runtime)
    params.set_search_options(max_length=len(prompt) + 20)
    generator = og.Generator(runtime, params)
    generator.append_tokens([prompt])
    tokens, steps = [], []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(generator.get_output("logits")[0, -1].copy())
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == ours_greedy(model, prompt, 20)
    with torch.no_grad():
        ours = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1 :].numpy()
    np.testing.assert_allclose(np.stack(steps), ours, atol=1e-4, rtol=0)


def test_onnx_left_padded_batch_matches_unpadded_rows(onnx_models, bpe):
    model, folder = onnx_models["llama"]
    session = ort_session(folder)
    short, long = bpe.encode("Once upon a time"), bpe.encode(STORY)[:9]
    width = max(len(short), len(long))
    ids = np.array([[0] * (width - len(r)) + r for r in (short, long)], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in (short, long)], dtype=np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    empty = np.zeros((2, model.config.kv_heads, 0, model.config.head_size), dtype=np.float32)
    logits, _ = ort_step(session, model.config, ids, mask, positions, [empty] * (2 * model.config.n_layer))
    assert np.isfinite(logits).all()
    with torch.no_grad():
        for row, prompt in enumerate((short, long)):
            np.testing.assert_allclose(logits[row, -1], model(torch.tensor([prompt]))[0, -1].numpy(), atol=1e-4, rtol=0)


# -- bad input --------------------------------------------------------------------------------------------


def test_a_variant_a_format_cannot_hold_is_refused_naming_it_and_the_formats_that_can(bpe, tmp_path):
    with pytest.raises(UserError, match=r"GGUF cannot hold this model \(qk_norm=True\).*formats that can: onnx$"):
        export(tiny(bpe.vocab_size, qk_norm=True), bpe, tmp_path / "m.gguf", "gguf")
    neo = tiny(bpe.vocab_size, attn_scale=1.0, local_window=8, local_layers=(1,))
    with pytest.raises(UserError, match=r"ONNX cannot hold this model \(attn_scale=1.0, local_window=8, "
                                        r"local_layers=\(1,\)\).*formats that can: hf$"):  # fmt: skip
        export(neo, bpe, tmp_path / "onnx", "onnx")
    with pytest.raises(UserError, match="GGUF cannot hold .*formats that can: hf$"):
        export(neo, bpe, tmp_path / "neo.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_gguf_and_refuses_to_overwrite(bpe, tmp_path):
    run = save(tmp_path / "ckpt", tiny(bpe.vocab_size), bpe)
    code, out, err = cli("export", "--checkpoint", run, "--format", "gguf", "--outtype", "q8_0", "--out",
                         tmp_path / "story.gguf")  # fmt: skip
    assert code == 0 and "GGUF file (q8_0)" in out, err
    assert (tmp_path / "story.gguf").read_bytes()[:4] == b"GGUF"
    code, _, err = cli("export", "--checkpoint", run, "--format", "gguf", "--out", tmp_path / "a" / "b.gguf")
    assert code == 0 and (tmp_path / "a" / "b.gguf").read_bytes()[:4] == b"GGUF", err  # its folder made, as for hf
    before = (tmp_path / "story.gguf").read_bytes()
    (tmp_path / "link.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = cli("export", "--checkpoint", run, "--format", "gguf", "--out", tmp_path / "story.gguf")
    assert code == 2 and "exists; choose another --out" in err and len(err.strip().splitlines()) == 1, err
    model, cases = (
        tiny(bpe.vocab_size),
        [
            ("gguf", tmp_path / "link.gguf", None, "is a symlink"),
            ("onnx", tmp_path / "full", None, "exists and is not empty"),
            ("onnx", tmp_path / "story.gguf", None, "exists and is not a folder"),
            ("onnx", tmp_path / "new", "f16", "--outtype applies to --format gguf"),
            ("hf", tmp_path / "link.gguf", None, "is a symlink"),
        ],
    )
    for format, out, outtype, message in cases:
        with pytest.raises(UserError, match=message):
            export(model, bpe, out, format, outtype)
    assert (tmp_path / "story.gguf").read_bytes() == before and not (tmp_path / "elsewhere.gguf").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"] and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
