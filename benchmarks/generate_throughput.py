"""Generation throughput: our KV-cache decoding against Hugging Face `generate()` on the same weights.

    python benchmarks/generate_throughput.py [--presets 1M 8M] [--new-tokens 200] [--device auto] [--no-portable]

On the CPU, the same weights also run as int8 (`--dtype int8`), in llama.cpp (GGUF f32 and q8_0, via
llama-cpp-python, as many threads as torch) and in onnxruntime (the ONNX export, greedy loop over its KV cache):
one row each under ours, with the ratio ours / theirs; a runtime that is not installed is named and skipped.

For each preset, a randomly initialised model (4096-token vocabulary; speed does not depend on the weights)
is copied into transformers' GPT2LMHeadModel, and both decode greedily from the same 16-token prompts at
batch 1 and batch 8, exactly `--new-tokens` tokens each (no EOS), alternating over `--rounds` rounds; the
best round of each is reported. The two must produce the same tokens; the script says if they do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.hf import to_transformers
from gpt_tinystories.model import GPT
from gpt_tinystories.runtime import pick_device


def ours_generate(model: GPT, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), new_tokens, Sampling(temperature=0))


@torch.inference_mode()
def hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: greedy, every row of a batch as its own sequence."""

    def __init__(self, path: Path, batch: int, threads: int) -> None:
        import llama_cpp as lib

        self.lib = lib
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = 512 * batch, 512 * batch, batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(512 * batch, 0, batch)

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        rows = prompts.tolist()
        entries = [(t, pos, row, pos == len(r) - 1) for row, r in enumerate(rows) for pos, t in enumerate(r)]
        outputs: list[list[int]] = [[] for _ in rows]
        for _ in range(new_tokens):
            b = self.batch
            b.n_tokens = len(entries)
            for i, (token, pos, row, wanted) in enumerate(entries):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wanted
                b.seq_id[i][0] = row
            if lib.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            wanted = [i for i, entry in enumerate(entries) if entry[3]]
            for row, i in enumerate(wanted):
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                outputs[row].append(int(logits.argmax()))
            entries = [
                (out[-1], len(r) + len(out) - 1, row, True)
                for row, (r, out) in enumerate(zip(rows, outputs, strict=True))
            ]
        return outputs


class OnnxRuntime:
    """onnxruntime on the ONNX export: a greedy loop feeding each step's present keys/values back as past."""

    def __init__(self, folder: Path, config: ModelConfig, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options, ["CPUExecutionProvider"])
        self.config = config

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        config, ids = self.config, prompts.numpy().astype(np.int64)
        batch = ids.shape[0]
        past = [np.zeros((batch, config.kv_heads, 0, config.head_size), np.float32)] * (2 * config.n_layer)
        outputs = []
        for _ in range(new_tokens):
            length = past[0].shape[2]
            feeds = {"input_ids": ids, "attention_mask": np.ones((batch, length + ids.shape[1]), np.int64),
                     "position_ids": np.tile(np.arange(length, length + ids.shape[1]), (batch, 1))}  # fmt: skip
            feeds |= {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}
            logits, *past = self.session.run(None, feeds)
            ids = logits[:, -1].argmax(-1)[:, None]
            outputs.append(ids[:, 0])
        return np.stack(outputs, axis=1).tolist()


def bpe(vocab_size: int):
    """A BPE of the benchmark's vocabulary size, trained on the TinyStories sample beside the repo."""
    from gpt_tinystories.data import iter_stories
    from gpt_tinystories.tokenizer import Tokenizer

    sample = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"
    return Tokenizer.train(iter_stories(sample), vocab_size)


def portable_runners(ours: GPT, batch: int, folder: Path) -> dict[str, object]:
    """What else runs the same weights on a CPU: int8 (ours), llama.cpp (GGUF f32, q8_0), onnxruntime (ONNX).
    Each is a function (prompts, new_tokens) -> tokens, or a string saying why it is missing."""
    from gpt_tinystories.exports import export
    from gpt_tinystories.quantize import quantize_int8

    threads, int8 = torch.get_num_threads(), quantize_int8(ours)
    tokenizer = bpe(ours.config.vocab_size)  # it only travels along in the files
    runners: dict[str, object] = {"int8 (ours)": lambda p, n: ours_generate(int8, p, n)}
    for outtype in ("f32", "q8_0"):
        try:
            path = folder / f"{ours.config.d_model}-{outtype}.gguf"
            if not path.exists():
                export(ours, tokenizer, path, "gguf", outtype)
            from llama_cpp._utils import suppress_stdout_stderr

            with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor it loads
                runners[f"llama.cpp {outtype}"] = LlamaCpp(path, batch, threads).generate
        except ImportError as error:
            runners[f"llama.cpp {outtype}"] = f"not installed ({error.name})"
    try:
        onnx = folder / f"{ours.config.d_model}-onnx"
        if not onnx.exists():
            export(ours, tokenizer, onnx, "onnx")
        runners["onnxruntime"] = OnnxRuntime(onnx, ours.config, threads).generate
    except ImportError as error:
        runners["onnxruntime"] = f"not installed ({error.name})"
    return runners


def portable_rows(ours: GPT, prompts: torch.Tensor, new_tokens: int, rounds: int, ours_rate: float,
                  ours_tokens: list[list[int]], folder: Path) -> None:  # fmt: skip
    for name, runner in portable_runners(ours, prompts.shape[0], folder).items():
        if isinstance(runner, str):
            print(f"{'':<7} {'':>5}   {name:<14} {runner}")
            continue
        runner(prompts, 2)  # warm up
        seconds, tokens = min(timed(runner, prompts, new_tokens) for _ in range(rounds))
        rate = prompts.numel() // prompts.shape[1] * new_tokens / seconds
        same = sum(a == b for row, ref in zip(tokens, ours_tokens, strict=True) for a, b in zip(row, ref, strict=True))
        print(f"{'':<7} {'':>5}   {name:<14} {rate:>9,.0f} tok/s   ours/this {ours_rate / rate:>5.2f}x   "
              f"same tokens {same}/{prompts.shape[0] * new_tokens}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1M", "8M"])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="our model's dtype (HF: fp32)")
    parser.add_argument("--portable", action=argparse.BooleanOptionalAction, default=True,
                        help="also int8, llama.cpp (GGUF) and onnxruntime (ONNX) rows, on the CPU")  # fmt: skip
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}"
          f"{f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else ''}")  # fmt: skip
    print(f"greedy decoding of {args.new_tokens} new tokens after a 16-token prompt; best of {args.rounds} rounds; "
          f"ours in {args.dtype}, HF in fp32")  # fmt: skip
    print(f"{'preset':<7} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}  same tokens")
    folder = Path(tempfile.mkdtemp(prefix="generate-throughput-"))  # exported files, reused across batch sizes
    for preset in args.presets:
        torch.manual_seed(0)
        ours = GPT(ModelConfig.from_preset(preset, 4096)).to(device).eval()
        theirs = to_transformers(ours)
        ours = ours.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        for batch in (1, 8):
            prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
            best = {"ours": float("inf"), "hf": float("inf")}
            for _ in range(args.rounds):
                seconds, our_tokens = timed(ours_generate, ours, prompts, args.new_tokens)
                best["ours"] = min(best["ours"], seconds)
                seconds, hf_tokens = timed(hf_generate, theirs, prompts, args.new_tokens)
                best["hf"] = min(best["hf"], seconds)
            same = hf_tokens[:, 16:].tolist() == our_tokens
            total = batch * args.new_tokens
            ours_rate, hf_rate = total / best["ours"], total / best["hf"]
            print(f"{preset:<7} {batch:>5} {ours_rate:>11,.0f} {hf_rate:>10,.0f} {ours_rate / hf_rate:>5.2f}x  {same}")
            if args.portable and device.type == "cpu" and args.dtype == "fp32":
                portable_rows(ours, prompts, args.new_tokens, args.rounds, ours_rate, our_tokens, folder)


if __name__ == "__main__":
    main()
