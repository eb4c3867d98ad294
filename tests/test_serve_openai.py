"""The OpenAI-compatible routes, the API key and faults under load, through the official `openai` client
against the real server on loopback."""

import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from playground import wait_until_idle

from gpt_tinystories import serve

LIMITS = serve.Limits(max_prompt_chars=300, max_new_tokens=600, max_samples=3, max_queue=8, max_batch=8)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_one_model(url):
    (model,) = client(url).models.list().data
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "gpt-tinystories"
    assert client(url).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as error:
        client(url).models.retrieve("gpt-4")
    assert error.value.body["code"] == "model_not_found"


def test_a_completion_is_the_python_apis_story(url, teller):
    result = client(url).completions.create(model="tiny", prompt="Tom had a red ball.", max_tokens=30,
                                            temperature=0.9, top_p=0.95, seed=5)  # fmt: skip
    (choice,) = result.choices
    assert choice.text == teller.generate("Tom had a red ball.", 30, 0.9, top_p=0.95, seed=5)
    assert result.object == "text_completion" and result.model == "tiny" and result.id.startswith("cmpl-")
    prompt_tokens = len(teller.encode_prompt("Tom had a red ball."))
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.total_tokens == prompt_tokens + result.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length") and choice.index == 0


def test_a_list_of_prompts_with_n_samples_gives_each_choice_in_order(url, teller):
    prompts = ["Once upon a time", "The cat"]
    result = client(url).completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, seed=3)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    # choice i is prompt i // n, sample i % n, seeded with seed + i % n: the same as asking for each alone
    expected = [teller.generate(p, 12, 1.0, seed=3 + j) for p in prompts for j in range(2)]
    assert [c.text for c in result.choices] == expected
    assert result.usage.prompt_tokens == sum(len(teller.encode_prompt(p)) for p in prompts)


def test_a_streamed_completion_sends_the_same_text_then_done(url, teller):
    seed = next(s for s in range(50) if len(teller.generate("Lily", 200, 1.0, seed=s)) > 300)  # a long story
    stream = client(url).completions.create(model="tiny", prompt="Lily", max_tokens=200, temperature=1.0, seed=seed,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 20
    assert "".join(pieces) == teller.generate("Lily", 200, 1.0, seed=seed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_strings_end_a_choice_before_them(url, teller):
    whole = teller.generate("Lily", 80, 1.0, seed=2)
    stop = whole[20:23]
    cut = whole[: whole.index(stop)]
    result = client(url).completions.create(model="tiny", prompt="Lily", max_tokens=80, seed=2, stop=[stop, "@@@"])
    assert result.choices[0].text == cut and result.choices[0].finish_reason == "stop"
    stream = client(url).completions.create(model="tiny", prompt="Lily", max_tokens=80, seed=2, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == cut


def test_a_chat_continues_the_story_its_messages_tell(url, teller):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},  # left out: the model cannot follow it
        {"role": "user", "content": "Tom had a red ball."},
        {"role": "assistant", "content": "He liked to play with it."},
        {"role": "user", "content": [{"type": "text", "text": "One day"}]},
    ]
    expected = teller.generate("Tom had a red ball. He liked to play with it. One day", 25, 0.7, seed=4)
    result = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0.7,
                                                 seed=4)  # fmt: skip
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content == expected
    stream = client(url).chat.completions.create(model="tiny", messages=messages, max_completion_tokens=25,
                                                 temperature=0.7, seed=4, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "kwargs, status, param, message",
    [
        ({"max_tokens": 601}, 400, "max_tokens", "max_tokens: at most 600 on this server, got 601"),
        ({"n": 4}, 400, "n", "n: at most 3 on this server, got 4"),
        ({"prompt": "x" * 301}, 400, "prompt", "prompt: at most 300 characters on this server, got 301"),
        ({"temperature": -1}, 400, "temperature", "temperature: Input should be greater than or equal to 0"),
        ({"top_p": 0}, 400, "top_p", "top_p: Input should be greater than 0"),
        ({"extra_body": {"top_k": True}}, 400, "top_k", "top_k: Input should be a valid integer"),  # not 1: greedy
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop takes up to 4 non-empty strings"),
        ({"echo": True}, 400, "echo", "echo is not supported by this server"),
        ({"extra_body": {"temprature": 1}}, 400, "temprature", "temprature: Extra inputs are not permitted"),
        ({"model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist"),
    ],
)
def test_bad_requests_get_openais_error_shape(url, kwargs, status, param, message):
    request = {"model": "tiny", "prompt": "Hi", "max_tokens": 5, **kwargs}
    with pytest.raises(openai.APIStatusError) as error:
        client(url).completions.create(**request)
    assert error.value.status_code == status
    body = error.value.body  # the client unwraps {"error": {...}}
    assert message in body["message"] and body["param"] == param
    assert body["type"] == "invalid_request_error" and set(body) == {"message", "type", "param", "code"}


def test_bad_json_and_bad_messages_are_refused_in_openais_shape(url):
    response = httpx.post(url + "v1/completions", content="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON decode error" in response.json()["error"]["message"]
    response = httpx.post(url + "v1/chat/completions", json={"model": "tiny", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(url + "api/generate", json={"max_new_tokens": 0})  # our own routes keep their shape
    assert response.status_code == 422 and "max_new_tokens" in response.json()["error"]


def test_the_api_key_is_required_when_set(teller):
    with serve.running(serve.create_app(teller, LIMITS, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as error:
            client(url, "wrong").completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert error.value.body["code"] == "invalid_api_key"
        assert httpx.post(url + "api/generate", json={"max_new_tokens": 2}).status_code == 401
        assert httpx.get(url + "api/model", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert len(client(url, "s3cret").completions.create(model="tiny", prompt="Hi", max_tokens=2).choices) == 1
        ok = httpx.post(url + "api/generate", json={"max_new_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(url).status_code == 200 and httpx.get(url + "health").status_code == 200  # page, health


def test_over_capacity_answers_503_with_retry_after(teller):
    limits = serve.Limits(max_new_tokens=5000, max_queue=1, max_batch=1)
    with serve.running(serve.create_app(teller, limits)) as url:
        # seed 2: the tiny model's story from "Long" runs to the limit; unseeded it may end (EOS) within ~1,000
        # tokens, and the slot it frees would take the third request instead of refusing it
        long = {"model": "tiny", "prompt": "Long", "max_tokens": 5000, "stream": True, "seed": 2, "temperature": 1.0}
        with httpx.stream("POST", url + "v1/completions", json=long), httpx.stream("POST", url + "v1/completions",
                                                                                    json=long):  # fmt: skip
            deadline = time.monotonic() + 10
            while httpx.get(url + "health").json()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as error:
                client(url).completions.create(model="tiny", prompt="Hi", max_tokens=2)
            assert error.value.status_code == 503 and error.value.response.headers["retry-after"] == "1"
            assert error.value.body["code"] == "overloaded" and "busy" in error.value.body["message"]
        assert wait_until_idle(url)["cancelled"] == 2


def test_many_disconnects_under_load_never_stall_the_others(teller):
    limits = serve.Limits(max_new_tokens=600, max_batch=8, max_queue=32)  # more clients than slots: some wait
    expected = {seed: teller.generate(f"Story {seed}.", 100, 1.0, seed=seed) for seed in range(3)}
    results, errors = {}, []

    def leave_early(url: str, seed: int) -> None:  # read a few pieces of a long story, then vanish
        try:
            stream = client(url).completions.create(model="tiny", prompt=f"Gone {seed}", max_tokens=600, seed=seed,
                                                    stream=True)  # fmt: skip
            for number, _ in enumerate(stream):
                if number == 2 + seed % 5:
                    break
            stream.close()
        except Exception as error:  # reported below
            errors.append(error)

    def stay(url: str, seed: int) -> None:
        try:
            stream = client(url).completions.create(model="tiny", prompt=f"Story {seed}.", max_tokens=100, seed=seed,
                                                    stream=True)  # fmt: skip
            results[seed] = "".join(c.choices[0].text for c in stream if c.choices)
        except Exception as error:  # reported below
            errors.append(error)

    with serve.running(serve.create_app(teller, limits)) as url:
        threads = [threading.Thread(target=leave_early, args=(url, seed)) for seed in range(24)]
        threads[12:12] = [threading.Thread(target=stay, args=(url, seed)) for seed in range(3)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors and results == expected
        after = wait_until_idle(url)
        assert time.monotonic() - started < 120
        # every request ended: the 3 that stayed completed; of those that left, a few stories end (EOS) first
        assert after["cancelled"] + after["completed"] == 27 and after["cancelled"] >= 20
        assert after["running"] == 0 and after["queued"] == 0 and after["most_running"] == 8


class Faulty(torch.nn.Module):
    """The model, except that prefilling a prompt that starts with the token `poison` raises."""

    def __init__(self, model, poison):
        super().__init__()
        self.inner, self.poison, self.config, self.wte = model, poison, model.config, model.wte

    def forward(self, idx, cache=None):
        if idx.shape[1] > 1 and int(idx[0, 1]) == self.poison:
            raise RuntimeError("the engine broke on this request")
        return self.inner(idx, cache)

    def num_parameters(self, non_embedding=False):
        return self.inner.num_parameters(non_embedding)


def test_a_request_that_raises_in_the_engine_fails_alone(teller):
    from gpt_tinystories.generate import Storyteller

    poison = teller.tokenizer.encode("Poison")[0]
    faulty = Storyteller(Faulty(teller.model, poison), teller.tokenizer, teller.source)
    with serve.running(serve.create_app(faulty, LIMITS)) as url:
        results = {}

        def ask(prompt: str) -> None:
            try:
                results[prompt] = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=40, seed=1)
            except openai.APIStatusError as error:
                results[prompt] = error

        threads = [threading.Thread(target=ask, args=(p,)) for p in ("Tom", "Poison apple", "Lily", "Poison")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for prompt in ("Poison apple", "Poison"):
            assert isinstance(results[prompt], openai.InternalServerError) and results[prompt].status_code == 500
            assert "the engine broke on this request" in results[prompt].body["message"]
        for prompt in ("Tom", "Lily"):
            assert results[prompt].choices[0].text == teller.generate(prompt, 40, 1.0, seed=1)
        health = wait_until_idle(url)
        assert health["failed"] == 2 and health["completed"] == 2
        assert client(url).completions.create(model="tiny", prompt="Again", max_tokens=3).choices  # still serving


def test_serve_warns_when_it_listens_beyond_loopback_without_a_key(checkpoint_dir):
    def start(*extra, env=None):
        process = subprocess.Popen([sys.executable, "-m", "gpt_tinystories", "serve", "--checkpoint", checkpoint_dir,
                                    "--port", "0", "--host", "0.0.0.0", "--compile", "off", "--log-level", "warning",
                                    *extra], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, **(env or {})})  # fmt: skip
        line = process.stdout.readline()
        port = line.split(" at ")[1].split()[0].split(":")[2].rstrip("/")
        return process, port

    process, _ = start()
    process.terminate()
    assert "warning: listening on 0.0.0.0 without an API key" in process.communicate(timeout=30)[1]
    process, port = start(env={"GPT_TINYSTORIES_API_KEY": "k3y"})
    try:
        local = f"http://127.0.0.1:{port}/"
        assert httpx.post(local + "api/generate", json={"max_new_tokens": 2}).status_code == 401
        assert client(local, "k3y").completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
    finally:
        process.terminate()
    assert "warning" not in process.communicate(timeout=30)[1]
