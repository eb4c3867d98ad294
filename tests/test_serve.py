"""The story playground's HTTP API (`gpt-tinystories serve`), on a real server over loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
import torch
from playground import STEP, wait_until_idle

from gpt_tinystories import serve
from gpt_tinystories.generate import Sampling, generate

LIMITS = serve.Limits(max_prompt_chars=300, max_new_tokens=5000, max_samples=3, max_queue=8)


def stream_events(response: httpx.Response):
    """(event name, data, arrival time) for each Server-Sent Event of a streaming response."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: ")), time.perf_counter()


def test_health_and_model_info(url, teller):
    health = httpx.get(url + "health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = httpx.get(url + "api/model").json()
    assert info["parameters"] == sum(p.numel() for p in teller.model.parameters())
    assert info["preset"] is None and info["trained_as"] == "1M"  # d_model 32 is no preset's shape
    assert info["config"]["context_length"] == 64 and info["config"]["d_model"] == 32
    assert info["tokenizer"] == {"name": teller.tokenizer.name, "vocab_size": 4096, "eos_id": 0}
    assert info["training"]["step"] == STEP and info["training"]["tokens"] == STEP * 512
    assert info["limits"] == {"max_prompt_chars": 300, "max_new_tokens": 5000, "max_samples": 3, "max_queue": 8,
                              "max_batch": 16}  # fmt: skip
    page = httpx.get(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and "api/generate/stream" in page.text


def test_a_completion_is_the_python_apis_story(url, teller):
    body = {"prompt": "Tom had a red ball.", "max_new_tokens": 30, "temperature": 0.9, "top_k": 50, "seed": 5}
    response = httpx.post(url + "api/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    (sample,) = result["samples"]
    assert sample["text"] == teller.generate(body["prompt"], 30, 0.9, top_k=50, seed=5)
    prompt = teller.encode_prompt(body["prompt"])
    assert result["prompt_tokens"] == len(prompt)
    (tokens,) = generate(teller.model, [prompt], 30, Sampling(0.9, 50), 0, torch.Generator().manual_seed(5))
    assert sample["tokens"] == result["completion_tokens"] == len([t for t in tokens if t != 0])
    assert sample["finish_reason"] == ("eos" if tokens[-1] == 0 else "length")
    timing = result["timing"]
    assert 0 <= timing["queue_seconds"] <= timing["first_token_seconds"] <= timing["total_seconds"]
    assert timing["tokens_per_second"] > 0
    # the same seed gives the same story; n samples are the rows of one batch, as generate(num_samples=n)
    again = httpx.post(url + "api/generate", json=body).json()
    assert again["samples"] == result["samples"]
    several = httpx.post(url + "api/generate", json={**body, "n": 3}).json()
    assert [s["text"] for s in several["samples"]] == teller.generate(body["prompt"], 30, 0.9, 50, seed=5,
                                                                      num_samples=3)  # fmt: skip
    assert [s["index"] for s in several["samples"]] == [0, 1, 2]


def test_the_stream_sends_text_as_it_is_generated(url, teller):
    body = {"prompt": "Once upon a time", "max_new_tokens": 600, "temperature": 1.0, "seed": 11}
    with httpx.stream("POST", url + "api/generate/stream", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(stream_events(response))
    names = [name for name, _, _ in events]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"text"}
    texts = [data for name, data, _ in events if name == "text"]
    assert len(texts) > 100
    done = events[-1][1]
    streamed = "".join(piece["text"] for piece in texts)
    assert streamed == done["samples"][0]["text"] == teller.generate(body["prompt"], 600, 1.0, seed=11)
    assert texts[-1]["tokens"] == done["completion_tokens"]
    assert events[0][1]["prompt_tokens"] == done["prompt_tokens"] == len(teller.encode_prompt(body["prompt"]))
    # incrementally: the text arrived while the model wrote it, not all at the end (a loose bound: on a loaded
    # 2-core machine the client is not always scheduled as the pieces arrive)
    arrived = events[-1][2] - next(t for name, _, t in events if name == "text")
    writing = done["timing"]["total_seconds"] - done["timing"]["first_token_seconds"]
    assert arrived > 0.25 * writing > 0


@pytest.mark.parametrize("endpoint", ["api/generate", "api/generate/stream"])
@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_new_tokens": 5001}, "max_new_tokens: Input should be less than or equal to 5000"),
        ({"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"n": 4}, "n: Input should be less than or equal to 3"),
        ({"prompt": "x" * 301}, "prompt: String should have at most 300 characters"),
        ({"temperature": -0.5}, "temperature: Input should be greater than or equal to 0"),
        ({"top_p": 0}, "top_p: Input should be greater than 0"),
        ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
        ({"top_k": True}, "top_k: Input should be a valid integer"),  # lax pydantic read it as 1: greedy
        ({"seed": 1.0}, "seed: Input should be a valid integer"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"max_new_tokens": "many"}, "max_new_tokens: Input should be a valid integer"),
        ({"temprature": 1.0}, "temprature: Extra inputs are not permitted"),
        ("[1, 2]", "request body: Input should be a valid dictionary"),
        ("{not json", "JSON decode error"),
        ('{"temperature": NaN}', "temperature: Input should be a finite number"),  # once a 500: NaN in the answer
    ],
)
def test_invalid_requests_get_422_with_a_clear_message(url, endpoint, body, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(url + endpoint, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_concurrent_requests_are_all_served(url, teller):
    bodies = [{"prompt": f"Story {seed}.", "max_new_tokens": 80, "seed": seed} for seed in range(6)]
    results: dict[int, str] = {}
    queued: list[float] = []

    def ask(seed: int) -> None:
        if seed % 2:  # half of them stream
            with httpx.stream("POST", url + "api/generate/stream", json=bodies[seed], timeout=60) as response:
                done = [data for name, data, _ in stream_events(response) if name == "done"][0]
        else:
            done = httpx.post(url + "api/generate", json=bodies[seed], timeout=60).json()
        results[seed] = done["samples"][0]["text"]
        queued.append(done["timing"]["queue_seconds"])

    before = httpx.get(url + "health").json()["completed"]
    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {seed: teller.generate(f"Story {seed}.", 80, seed=seed) for seed in range(6)}
    health = wait_until_idle(url)
    assert health["completed"] == before + 6
    assert health["most_running"] >= 2  # decoded side by side (continuous batching), not one after another


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_disconnects_stops_its_generation(url, streaming):
    body = {"prompt": "The end?", "max_new_tokens": 5000, "temperature": 1.0, "seed": 2}  # seconds of work
    before = wait_until_idle(url)
    if streaming:
        with httpx.stream("POST", url + "api/generate/stream", json=body) as response:
            for name, _, _ in stream_events(response):
                if name == "text":
                    break  # leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "api/generate", json=body, timeout=httpx.Timeout(5, read=0.3))
    left = time.monotonic()
    after = wait_until_idle(url)
    assert time.monotonic() - left < 2
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert 0 < after["tokens_generated"] - before["tokens_generated"] < 2500
    # the worker is free again
    assert httpx.post(url + "api/generate", json={"max_new_tokens": 3}).status_code == 200


def test_a_full_queue_answers_503_and_waiting_requests_can_leave(teller):
    # seed 2: the tiny model's story from "Long" runs to the limit (seed 0's ends after ~930 tokens, freeing the slot)
    long = {"prompt": "Long", "max_new_tokens": 5000, "temperature": 1.0, "seed": 2}
    with (
        serve.running(serve.create_app(teller, serve.Limits(max_new_tokens=5000, max_queue=1, max_batch=1))) as url,
        ExitStack() as streams,
    ):
        running = streams.enter_context(httpx.stream("POST", url + "api/generate/stream", json=long))
        events = stream_events(running)  # kept: dropping the iterator would close the connection
        assert next(events)[0] == "start"
        waiting = streams.enter_context(httpx.stream("POST", url + "api/generate/stream", json=long))
        assert waiting.status_code == 200
        deadline = time.monotonic() + 5
        while httpx.get(url + "health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(url + "api/generate", json={"max_new_tokens": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy (1 requests are waiting); retry in a moment" in refused.json()["error"]
        streams.close()
        health = wait_until_idle(url)
        assert health["cancelled"] == 2 and health["completed"] == 0  # the waiting one never started


def cli(*args, **popen):
    # Ctrl-C must reach the server even when this test runs in a background job, which starts with SIGINT ignored
    return subprocess.Popen([sys.executable, "-m", "gpt_tinystories", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint,
                            **popen)  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_serve_command_listens_on_loopback_and_stops_on_ctrl_c(checkpoint_dir):
    process = cli("serve", "--checkpoint", checkpoint_dir, "--port", "0", "--log-level", "warning")
    try:
        line = process.stdout.readline()
        assert line.startswith(f"story playground for {checkpoint_dir} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        assert httpx.get(url + "health").json()["status"] == "ok"
        result = httpx.post(url + "api/generate", json={"prompt": "Hi", "max_new_tokens": 5, "seed": 0}).json()
        assert result["completion_tokens"] <= 5
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err, err


def test_the_serve_command_stops_normally_on_sigterm(checkpoint_dir):
    # a service manager's stop (systemd, docker stop) is not a failure: exit 0, where Ctrl-C exits 130
    process = cli("serve", "--checkpoint", checkpoint_dir, "--port", "0", "--log-level", "warning")
    try:
        assert process.stdout.readline().startswith("story playground for ")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/none"], "no checkpoint at"),
        (["--checkpoint", "{ckpt}", "--port", "{taken}"], "is in use; pick another with --port"),
        (["--checkpoint", "{ckpt}", "--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
        (["--checkpoint", "{ckpt}", "--port", "70000"], "expected a port number 0-65535"),
        (["--checkpoint", "{ckpt}", "--max-new-tokens", "0"], "positive integer"),
    ],
)
def test_serve_command_errors_are_one_line(args, message, checkpoint_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [a.format(tmp=tmp_path, ckpt=checkpoint_dir, taken=taken.getsockname()[1]) for a in args]
        process = cli("serve", "--port", "0", *args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_a_request_asks_by_default_for_the_servers_cap_since_a_story_stops_at_its_end():
    body = serve.request_model(serve.Limits(max_new_tokens=700))()
    assert body.max_new_tokens == 700 and body.temperature == 0.8 and body.n == 1
