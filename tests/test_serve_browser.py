"""The playground page in headless Chromium (Debian's `chromium`, driven by Playwright): type, generate, watch.

Skipped when Chromium or Playwright is missing, unless GPT_TINYSTORIES_REQUIRE_BROWSER=1 (CI sets it), which
makes their absence a failure.
"""

import os
import re
import shutil
import time
from typing import Any, NamedTuple

import httpx
import pytest
from playground import save_tiny_checkpoint

from gpt_tinystories import load, serve
from gpt_tinystories.generate import Storyteller

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("GPT_TINYSTORIES_REQUIRE_BROWSER") == "1"


def _missing() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path/to/chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


class Playground(NamedTuple):
    page: Any  # a playwright Page (playwright is imported only where Chromium is present)
    teller: Storyteller
    url: str


@pytest.fixture(scope="module")
def playground(tmp_path_factory, bpe):
    if reason := _missing():
        if REQUIRED:
            pytest.fail(f"browser test required (GPT_TINYSTORIES_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    teller = load(save_tiny_checkpoint(tmp_path_factory.mktemp("browser") / "tiny", bpe))
    with serve.running(serve.create_app(teller, serve.Limits(max_new_tokens=5000))) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.goto(url)
        yield Playground(page, teller, url)
        browser.close()


def test_typing_a_prompt_and_generating_streams_the_story_in(playground):
    page = playground.page
    page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
    assert "158,592 parameters" in page.text_content("#model-info")
    # record when the story grows, to see it arrive piece by piece
    page.evaluate("""() => {
        window.growth = [];
        new MutationObserver(() => window.growth.push(performance.now()))
            .observe(document.getElementById('continuation'), {childList: true});
    }""")
    prompt = "Lily saw a big red ball in the park."
    page.fill("#prompt", prompt)
    page.fill("#temperature", "1")
    page.fill("#max-new-tokens", "600")
    page.fill("#seed", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('continuation').textContent.length > 0")
    page.wait_for_selector("#generate:enabled", timeout=30_000)
    assert page.text_content("#story-prompt") == prompt
    expected = playground.teller.generate(prompt, max_new_tokens=600, temperature=1.0, seed=4)
    assert page.text_content("#continuation") == expected
    stats = page.text_content("#stats")
    tokens, rate = re.fullmatch(r"(\d+) tokens, (\d+) tokens/s, first text after \d+ ms(, the end)?", stats).groups()[
        :2
    ]
    assert int(tokens) > 100 and int(rate) > 0
    growth = page.evaluate("window.growth")
    # Streamed: the story grew in many separate updates (a whole response would be one). How far apart they
    # land depends on the machine's load, so no timing bound is asserted (a 0.5x one failed under CI load).
    assert len(growth) > 10 and growth[-1] > growth[0]


def test_stop_ends_the_generation_on_the_server(playground):
    page = playground.page
    before = httpx.get(playground.url + "health").json()
    page.fill("#prompt", "The end?")
    page.fill("#max-new-tokens", "5000")
    page.fill("#seed", "2")  # a story of ~2,800 tokens: seconds of work
    page.click("#generate")
    page.wait_for_function("document.getElementById('continuation').textContent.length > 0")
    page.click("#stop")
    page.wait_for_selector("#generate:enabled")
    assert page.text_content("#stats").startswith("stopped after")
    deadline = time.monotonic() + 5
    while (health := httpx.get(playground.url + "health").json())["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health["cancelled"] == before["cancelled"] + 1 and health["completed"] == before["completed"]
    assert health["tokens_generated"] - before["tokens_generated"] < 2000
