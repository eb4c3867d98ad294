"""Load on the story playground: N concurrent streaming clients on loopback for a bounded time.

    python benchmarks/serve_load.py [--presets 1M 8M] [--clients 1 4 16 64] [--seconds 10] [--max-new-tokens 200]
                                    [--checkpoint RUN] [--device cpu|cuda] [--compile off|on|auto]

On a GPU: `--device cuda --compile on --presets 8M 28M` (the decode step as CUDA graphs).

`gpt-tinystories serve` runs in its own process (so the clients do not share its interpreter); without
--checkpoint it serves a randomly initialised model of --preset with a 4096-token BPE trained on --sample
(speed does not depend on the weights; random weights rarely end a story early, so nearly every request
writes all --max-new-tokens tokens). The server batches requests in flight (continuous batching) with
--max-batch KV-cache slots (default: the largest client count). Each client streams one request after another,
for --seconds; requests still running then are finished but not counted. Latencies are measured by the client,
from sending the request to the first text event and to the end of the stream. After the table, the goals of
issue 16: tokens/s at 16 clients >= 4x the 1-client figure, p99 time to first token at 16 clients <= 0.5 s.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import gpt_tinystories
from gpt_tinystories import checkpoint
from gpt_tinystories.config import ModelConfig
from gpt_tinystories.data import iter_stories
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.model import GPT
from gpt_tinystories.tokenizer import TOKENIZER_FILE, Tokenizer

PROMPTS = ["Once upon a time", "Tom had a red ball.", "Lily went to the park with her mom.", "The cat was sad."]


def random_checkpoint(directory: Path, preset: str, sample: Path) -> Path:
    tokenizer = Tokenizer.train(iter_stories(sample), 4096)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, tokenizer.vocab_size)
    meta = {"step": 0, "tokens": 0, "model_config": config.to_dict(), "train_config": {"preset": preset},
            "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "file": TOKENIZER_FILE}}  # fmt: skip
    return checkpoint.save(
        directory, GPT(config).state_dict(), meta, None, {TOKENIZER_FILE: tokenizer.backend.to_str()}
    )


def in_process(source: str | Path, max_new_tokens: int, requests: int = 20) -> tuple[float, float]:
    """Tokens/s and seconds per request of the same requests decoded in this process, one after another."""
    teller = gpt_tinystories.load(source)
    tokens, started = 0, time.perf_counter()
    for request in range(requests):
        prompt = [teller.encode_prompt(PROMPTS[request % len(PROMPTS)])]
        generator = torch.Generator().manual_seed(request)
        (new,) = generate(teller.model, prompt, max_new_tokens, Sampling(0.8), teller.tokenizer.eos_id, generator)
        tokens += len(new)
    seconds = time.perf_counter() - started
    return tokens / seconds, seconds / requests


async def client(http: httpx.AsyncClient, url: str, number: int, until: float, max_new_tokens: int, results: list):
    request = 0
    while time.perf_counter() < until:
        body = {
            "prompt": PROMPTS[request % len(PROMPTS)],
            "max_new_tokens": max_new_tokens,
            "seed": number * 10_000 + request,
        }
        sent, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", url + "api/generate/stream", json=body) as response:
            response.raise_for_status()
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif event == "text" and first is None:
                    first = time.perf_counter()
                elif event == "done" and line.startswith("data: "):
                    tokens = json.loads(line.removeprefix("data: "))["completion_tokens"]
        ended = time.perf_counter()
        if ended <= until:
            results.append({"first": (first or ended) - sent, "end": ended - sent, "tokens": tokens})
        request += 1


async def load(url: str, clients: int, seconds: float, max_new_tokens: int) -> list[dict]:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(client(http, url, n, until, max_new_tokens, results) for n in range(clients)))
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:  # no request finished within the row's time
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def serve_preset(args, preset: str, tmp: str) -> dict[int, dict]:
    """Start a server for one model, run every client count against it; {clients: figures}."""
    source = args.checkpoint or random_checkpoint(Path(tmp) / preset, preset, args.sample)
    max_batch = args.max_batch or max(args.clients)
    command = [sys.executable, "-m", "gpt_tinystories", "serve", "--checkpoint", str(source), "--port", "0",
               "--log-level", "warning", "--max-queue", str(max(args.clients) + 1), "--max-batch", str(max_batch),
               "--device", args.device, "--compile", args.compile]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    rows = {}
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        info = httpx.get(url + "api/model").json()
        print(f"model: {info['preset'] or 'custom'} ({info['parameters']:,} parameters, {info['dtype']}, "
              f"{info['device']}), tokenizer {info['tokenizer']['name']}; {args.max_new_tokens} new tokens per "
              f"request, {args.seconds:g} s per row, max batch {max_batch}, compile {args.compile}")  # fmt: skip
        if args.device == "cpu":
            rate, per_request = in_process(source, args.max_new_tokens)
            print(f"in this process, one request at a time, without HTTP: {rate:,.0f} tokens/s, "
                  f"{per_request:.3f} s per request")  # fmt: skip
        print(f"{'clients':>7} {'requests':>8} {'req/s':>6} {'tokens/s':>8} {'first p50':>9} {'first p99':>9} "
              f"{'end p50':>8} {'end p99':>8}")  # fmt: skip
        for clients in args.clients:
            asyncio.run(load(url, clients, min(args.seconds, 3), args.max_new_tokens))  # warm-up, not counted
            done = asyncio.run(load(url, clients, args.seconds, args.max_new_tokens))
            first, end = [r["first"] for r in done], [r["end"] for r in done]
            tokens = sum(r["tokens"] for r in done)
            rows[clients] = {"tokens_per_second": tokens / args.seconds, "first_p99": percentile(first, 99)}
            print(f"{clients:>7} {len(done):>8} {len(done) / args.seconds:>6.2f} {tokens / args.seconds:>8,.0f} "
                  f"{percentile(first, 50):>8.3f}s {percentile(first, 99):>8.3f}s "
                  f"{percentile(end, 50):>7.3f}s {percentile(end, 99):>7.3f}s", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--checkpoint", help="a run dir (default: a random model of each --presets)")
    parser.add_argument("--presets", nargs="+", default=["1M", "8M"])
    parser.add_argument("--max-batch", type=int, help="the server's KV-cache slots (default: the most clients)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=["off", "on", "auto"], default="off")
    parser.add_argument(
        "--sample", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"
    )
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f"{f', {torch.cuda.get_device_name()}' if args.device.startswith('cuda') else ''}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [args.checkpoint] if args.checkpoint else args.presets:
            rows = serve_preset(args, preset, tmp)
            if 1 in rows and 16 in rows:
                scale = rows[16]["tokens_per_second"] / rows[1]["tokens_per_second"]
                print(f"goals: tokens/s at 16 clients = {scale:.1f}x 1 client (goal >= 4x); "
                      f"p99 first token at 16 clients {rows[16]['first_p99']:.3f} s (goal <= 0.5 s)\n")  # fmt: skip


if __name__ == "__main__":
    main()
