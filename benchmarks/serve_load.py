"""Load on the story playground: N concurrent streaming clients on loopback for a bounded time.

    python benchmarks/serve_load.py [--clients 1 4 16] [--seconds 20] [--max-new-tokens 200] [--checkpoint RUN]

`gpt-tinystories serve` runs in its own process (so the clients do not share its interpreter); without
--checkpoint it serves a randomly initialised model of --preset with a 4096-token BPE trained on --sample
(speed does not depend on the weights; random weights rarely end a story early, so nearly every request
writes all --max-new-tokens tokens). Each client streams one request after another, for --seconds; requests
still running then are finished but not counted. Latencies are measured by the client, from sending the
request to the first text event and to the end of the stream.
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
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--checkpoint", help="a run dir (default: a random model of --preset)")
    parser.add_argument("--preset", default="1M")
    parser.add_argument(
        "--sample", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.checkpoint or random_checkpoint(Path(tmp) / "model", args.preset, args.sample)
        command = [sys.executable, "-m", "gpt_tinystories", "serve", "--checkpoint", str(source), "--port", "0",
                   "--log-level", "warning", "--max-queue", str(max(args.clients) + 1)]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split(" at ")[1].split()[0]
            info = httpx.get(url + "api/model").json()
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
            print(f"model: {info['preset'] or 'custom'} ({info['parameters']:,} parameters, {info['dtype']}, "
                  f"{info['device']}), tokenizer {info['tokenizer']['name']}; {args.max_new_tokens} new tokens per "
                  f"request, {args.seconds:g} s per row")  # fmt: skip
            rate, per_request = in_process(source, args.max_new_tokens)
            print(f"in this process, without HTTP: {rate:,.0f} tokens/s, {per_request:.3f} s per request")
            print(f"{'clients':>7} {'requests':>8} {'req/s':>6} {'tokens/s':>8} {'first p50':>9} {'first p99':>9} "
                  f"{'end p50':>8} {'end p99':>8}")  # fmt: skip
            for clients in args.clients:
                done = asyncio.run(load(url, clients, args.seconds, args.max_new_tokens))
                first, end = [r["first"] for r in done], [r["end"] for r in done]
                tokens = sum(r["tokens"] for r in done)
                print(f"{clients:>7} {len(done):>8} {len(done) / args.seconds:>6.2f} {tokens / args.seconds:>8,.0f} "
                      f"{percentile(first, 50):>8.3f}s {percentile(first, 99):>8.3f}s "
                      f"{percentile(end, 50):>7.3f}s {percentile(end, 99):>7.3f}s")  # fmt: skip
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
