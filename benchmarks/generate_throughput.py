"""Generation throughput: our decode engine (eager and with a compiled decode step) against Hugging Face
`generate()` on the same weights.

    python benchmarks/generate_throughput.py [--presets 1M 8M] [--new-tokens 200] [--device auto] [--runners ...]

For each preset, a randomly initialised model (4096-token vocabulary; speed does not depend on the weights)
decodes greedily from the same 16-token prompts at batch 1 and batch 8, exactly `--new-tokens` tokens each (no
EOS), every runner in turn over `--rounds` rounds; the best round of each is reported, with its ratio to
transformers' `generate()` and whether it produced the same tokens. Each runner is set up once per preset and
batch, outside the timing (the compiled step's compile time is printed beside the table).

Runners are a list of named setups (RUNNERS below): add a row source by appending one. On CUDA the compiled
step runs as CUDA graphs (torch.compile mode reduce-overhead).

On the CPU, the same weights also run as int8 (`--dtype int8`), as fp16 (`--dtype fp16`, compiled step), in
llama.cpp (GGUF f32 and q8_0, via llama-cpp-python, as many threads as torch) and in onnxruntime (the ONNX export,
a greedy loop over its KV cache); a runtime that is not installed, or not for this device, says so in its cell.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.engine import Engine, Sampling
from gpt_tinystories.model import GPT
from gpt_tinystories.runtime import pick_device

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import cpu_description, cpu_info  # noqa: E402

Decode = Callable[[torch.Tensor, int], list[list[int]]]  # (prompts (batch, 16), new tokens) -> new tokens per row


@dataclass
class Setup:
    """What a runner gets: our model (in --dtype), the preset, the batch and the new-token count."""

    model: GPT
    preset: str
    batch: int
    new_tokens: int
    dtype: str


@dataclass
class Runner:
    name: str
    setup: Callable[[Setup], Decode]  # may raise: the row then says why it could not run
    baseline: bool = False


def hf_runner(setup: Setup) -> Decode:
    from gpt_tinystories.hf import to_transformers

    theirs = to_transformers(copy.deepcopy(setup.model).float())  # transformers in fp32, whatever our dtype

    @torch.inference_mode()
    def decode(prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, prompts.shape[1] :].tolist()

    return decode


def engine_runner(compile: bool) -> Callable[[Setup], Decode]:
    def setup(setup: Setup) -> Decode:
        # one engine, reused by every round (as a server does): slots for the batch, room for prompt + new tokens
        engine = Engine(setup.model, setup.batch, capacity=16 + setup.new_tokens, compile=compile)
        if compile:
            seconds = engine.warm_up()
            print(f"  ({setup.preset}, batch {setup.batch}: compiling the decode step took {seconds:.1f} s)")

        def decode(prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
            sequences = [engine.add(row, new_tokens, Sampling(temperature=0)) for row in prompts.tolist()]
            while engine.busy:
                engine.step()
            return [s.generated for s in sequences]

        return decode

    return setup


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: greedy, every row of a batch as its own sequence."""

    def __init__(self, path: Path, batch: int, threads: int) -> None:
        import llama_cpp as lib

        self.lib = lib
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        # llama.cpp's repacking of q8_0 matrices for AMX segfaulted in the first decode on an Intel Xeon with
        # amx_int8 (llama.cpp issue #20824): there it gets plain CPU buffers; elsewhere its repacking, its fastest.
        model_params.use_extra_bufts = "amx_int8" not in cpu_info().get("flags", "").split()
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
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
        # Its threads would otherwise spin-wait after each run, taking the cores from the runner timed next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


EXPORTS = Path(tempfile.mkdtemp(prefix="generate-throughput-"))  # exported files, reused across batch sizes
atexit.register(shutil.rmtree, EXPORTS, ignore_errors=True)


def _cpu_only(setup: Setup) -> None:
    if next(setup.model.parameters()).device.type != "cpu" or setup.dtype != "fp32":
        raise RuntimeError("CPU fp32 weights only")


def _exported(setup: Setup, fmt: str, outtype: str | None = None) -> Path:
    from gpt_tinystories.exports import export

    path = EXPORTS / f"{setup.preset}-{fmt}{f'-{outtype}' if outtype else ''}{'.gguf' if fmt == 'gguf' else ''}"
    if not path.exists():
        export(setup.model, bpe(setup.model.config.vocab_size), path, fmt, outtype)  # the tokenizer only travels
    return path


def int8_runner(setup: Setup) -> Decode:
    from gpt_tinystories.quantize import quantize_int8

    _cpu_only(setup)
    return engine_runner(compile=False)(replace(setup, model=quantize_int8(setup.model)))


def fp16_runner(setup: Setup) -> Decode:
    from gpt_tinystories.quantize import half_weights

    _cpu_only(setup)
    return engine_runner(compile=True)(replace(setup, model=half_weights(setup.model)))


def llama_cpp_runner(outtype: str) -> Callable[[Setup], Decode]:
    def setup(setup: Setup) -> Decode:
        _cpu_only(setup)
        from llama_cpp._utils import suppress_stdout_stderr

        path = _exported(setup, "gguf", outtype)
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor it loads
            return LlamaCpp(path, setup.batch, torch.get_num_threads()).generate

    return setup


def onnxruntime_runner(setup: Setup) -> Decode:
    _cpu_only(setup)
    return OnnxRuntime(_exported(setup, "onnx"), setup.model.config, torch.get_num_threads()).generate


RUNNERS = [
    Runner("HF generate()", hf_runner, baseline=True),
    Runner("ours eager", engine_runner(compile=False)),
    Runner("ours compiled", engine_runner(compile=True)),
    Runner("ours int8", int8_runner),
    Runner("ours fp16 compiled", fp16_runner),
    Runner("llama.cpp f32", llama_cpp_runner("f32")),
    Runner("llama.cpp q8_0", llama_cpp_runner("q8_0")),
    Runner("onnxruntime", onnxruntime_runner),
]


def timed(decode: Decode, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = decode(prompts, new_tokens)
    if prompts.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def measure(runners: list[Runner], model: GPT, preset: str, batch: int, args, device) -> dict[str, tuple]:
    """{runner name: (tokens/s, tokens) or (None, why it could not run)} for one preset and batch."""
    prompts = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
    decoders: dict[str, Decode] = {}
    results: dict[str, tuple] = {}
    for runner in runners:
        try:
            decoders[runner.name] = runner.setup(Setup(model, preset, batch, args.new_tokens, args.dtype))
            timed(decoders[runner.name], prompts, 4)  # warm-up (and first-call allocations) outside the timing
        except Exception as error:  # a runner this machine cannot run (a missing package, say): its cell says why
            results[runner.name] = (None, f"{type(error).__name__}: {error}"[:80])
    best = {name: float("inf") for name in decoders}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):  # alternating, so that drifting machine load spreads over every runner
        for name, decode in decoders.items():
            seconds, tokens[name] = timed(decode, prompts, args.new_tokens)
            best[name] = min(best[name], seconds)
    for name in decoders:
        results[name] = (batch * args.new_tokens / best[name], tokens[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["1M", "8M"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="our model's dtype (HF: fp32)")
    parser.add_argument("--runners", nargs="+", help=f"a subset of: {', '.join(r.name for r in RUNNERS)}")
    args = parser.parse_args()
    # One process compiles the decode step for every runner's model at every batch size (a server: one model):
    # past Dynamo's default of 8 graphs per function, later runners would silently run eager.
    torch._dynamo.config.recompile_limit = 64
    device = pick_device(args.device)
    runners = [r for r in RUNNERS if not args.runners or r.name in args.runners or r.baseline]
    cpu = cpu_description()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}{f' ({torch.cuda.get_device_name()})' if device.type == 'cuda' else ''}")  # fmt: skip
    print(f"greedy decoding of {args.new_tokens} new tokens after a 16-token prompt; best of {args.rounds} rounds; "
          f"ours in {args.dtype}, HF in fp32; tokens/s (ratio to HF generate(), same tokens as HF)")  # fmt: skip
    baseline = next(r.name for r in runners if r.baseline)
    print(f"{'preset':<7} {'batch':>5} " + " ".join(f"{r.name:>28}" for r in runners), flush=True)
    for preset in args.presets:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = GPT(ModelConfig.from_preset(preset, 4096)).to(device, dtype).eval()
        for batch in args.batches:
            print_row(preset, batch, measure(runners, model, preset, batch, args, device), runners, baseline)


def print_row(preset: str, batch: int, results: dict[str, tuple], runners: list[Runner], baseline: str) -> None:
    base_rate, base_tokens = results[baseline]
    cells = []
    for runner in runners:
        rate, tokens = results[runner.name]
        if rate is None:
            cells.append(f"{'n/a (' + tokens + ')':>28}"[:28])
        elif runner.baseline:
            cells.append(f"{rate:>17,.0f} tok/s     ")
        else:
            ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
            same = "same" if tokens == base_tokens else "DIFFERENT"
            cells.append(f"{rate:>10,.0f} tok/s {ratio:>6} {same:>5}")
    print(f"{preset:<7} {batch:>5} " + " ".join(f"{c:>28}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
