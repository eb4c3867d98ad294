"""The judge verb end to end: completions, reports, reproducibility, the reference score, LLM grading over a
loopback server, compare, the Evaluator's judge(), and every bad input of the issue."""

import json
import os
import re
import shutil
import socket

import pytest
import torch
from conftest import sample
from judge_server import ScriptedJudge

from gpt_tinystories import load
from gpt_tinystories.cli import main
from gpt_tinystories.config import TrainConfig
from gpt_tinystories.generate import Sampling, generate
from gpt_tinystories.trainer import train

PROMPTS = ["Tom had a red ball.", "One day, Lily went to the park. She saw", 'Sue said, "']
TRAIN = sample("train-head.txt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("judge")
    config = TrainConfig(preset="1M", data=str(sample("validation-first1000.txt")), tokenizer=str(bpe.save(root)),
                         d_model=32, n_layer=2, n_head=4, context_length=64, batch_size=8, tokens_per_step=512,
                         max_steps=20, eval_every=10, eval_batches=2, sample_tokens=4, precision="fp32")  # fmt: skip
    train(config, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture(autouse=True)
def _capture(capsys):
    global _capsys
    _capsys = capsys


def cli(*args, **env):
    """The CLI in this process (a subprocess per call would spend most of the test importing torch)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        _capsys.readouterr()
        code = main([str(a) for a in args])
        captured = _capsys.readouterr()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return code, captured.out, captured.err


def judge(run_dir, prompts_file, out, *extra, **env):
    return cli("judge", "--checkpoint", run_dir, "--prompts", prompts_file, "--samples", "2", "--max-new-tokens",
               "12", "--seed", "3", "--out", out, "--device", "cpu", *extra, **env)  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_judge_writes_reports_of_exactly_the_seeded_completions(run_dir, prompts_file, tmp_path):
    code, out, err = judge(run_dir, prompts_file, tmp_path / "a", "--train-data", TRAIN)
    assert code == 0, err
    assert "distinct-2" in out and "reports in" in out
    rows = read_jsonl(tmp_path / "a" / "completions.jsonl")
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    teller = load(run_dir)
    prompts = [teller.encode_prompt(p) for p in PROMPTS for _ in range(2)]
    generator = torch.Generator().manual_seed(3 * 1_000_003)  # the judge's generator for its first batch
    expected = generate(teller.model, prompts, 12, Sampling(1.0), teller.tokenizer.eos_id, generator)
    eos = teller.tokenizer.eos_id
    assert [r["text"] for r in rows] == [teller.tokenizer.decode([t for t in e if t != eos]) for e in expected]
    assert [r["tokens"] for r in rows] == [len(e) for e in expected]
    assert [r["finished"] for r in rows] == [e[-1] == eos for e in expected]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["metrics"]["words"]["mean"] == pytest.approx(
        sum(sum(r["metrics"]["words"] for r in rows if r["prompt_index"] == p) / 2 for p in range(3)) / 3
    )
    assert report["index"]["n"] == 8 and report["index"]["stories"] == 2317
    assert set(rows[0]["metrics"]) >= {"copied_8gram_share", "longest_copied_span", "unknown_word_share"}
    assert "# Judge report" in (tmp_path / "a" / "report.md").read_text()
    # the same seed gives the same stories; a rerun into the same folder reuses them
    assert judge(run_dir, prompts_file, tmp_path / "b")[0] == 0
    assert [r["text"] for r in read_jsonl(tmp_path / "b" / "completions.jsonl")] == [r["text"] for r in rows]
    assert judge(run_dir, prompts_file, tmp_path / "a")[0] == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["generation"]["reused"] is True
    assert judge(run_dir, prompts_file, tmp_path / "a", "--temperature", "0.5")[0] == 0  # other settings: new ones
    assert json.loads((tmp_path / "a" / "report.json").read_text())["generation"]["reused"] is False


def test_report_html_is_one_self_contained_page(run_dir, prompts_file, tmp_path):
    assert judge(run_dir, prompts_file, tmp_path)[0] == 0
    page = (tmp_path / "report.html").read_text()
    rows = read_jsonl(tmp_path / "completions.jsonl")
    assert page.count("<div class=story") == 6
    assert "src=" not in page and "href=" not in page and "<link" not in page  # nothing to fetch
    assert "<span class=prompt>Sue said, &quot;</span>" in page  # the prompt, escaped, beside ...
    import html

    assert f"<span class=continuation>{html.escape(rows[4]['text'])}</span>" in page  # ... its continuation


def test_greedy_and_beam_search_write_one_story_per_prompt(run_dir, prompts_file, tmp_path):
    code, _, err = judge(run_dir, prompts_file, tmp_path / "g", "--temperature", "0", "--samples", "1")
    assert code == 0, err
    greedy = read_jsonl(tmp_path / "g" / "completions.jsonl")
    teller = load(run_dir)
    assert greedy[0]["text"] == teller.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
    code, _, err = judge(run_dir, prompts_file, tmp_path / "b", "--beams", "3", "--samples", "1")
    assert code == 0, err
    beams = read_jsonl(tmp_path / "b" / "completions.jsonl")
    assert beams[1]["text"] == teller.beam_search(PROMPTS[1], max_new_tokens=12, num_beams=3)


def test_reference_score_is_the_continuations_nats_per_gpt2_token(run_dir, prompts_file, tmp_path, gpt2):
    code, _, err = judge(run_dir, prompts_file, tmp_path, "--reference", run_dir)
    assert code == 0, err
    row = read_jsonl(tmp_path / "completions.jsonl")[2]
    teller = load(run_dir)
    tok = teller.tokenizer
    prompt, continuation = teller.encode_prompt(row["prompt"]), tok.encode(row["text"])
    continuation += [tok.eos_id] if row["finished"] else []
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(teller.model(ids[:, :-1]), dim=-1)[0]
    nats = -sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))
    expected = nats / (len(gpt2.encode(row["text"])) + row["finished"])
    assert row["metrics"]["reference_nats_per_gpt2_token"] == pytest.approx(expected, rel=1e-4)


def test_llm_grades_through_a_loopback_server(run_dir, prompts_file, tmp_path):
    with ScriptedJudge(default="grade:6") as server:
        args = ["--judge-url", server.url, "--judge-model", "scripted", "--judge-api-key-env", "TEST_KEY",
                "--judge-cache", tmp_path / "grades.sqlite"]  # fmt: skip
        code, out, err = judge(run_dir, prompts_file, tmp_path / "r", *args, TEST_KEY="test-key")
        assert code == 0, err
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        assert report["grading"]["graded"] == 6 and report["grading"]["from_cache"] == 0
        assert report["metrics"]["llm_plot"]["mean"] == 6.0
        assert report["grading"]["age_groups"]["C (6-7)"] == 6
        asked = sum(server.requests.values())
        code, out, err = judge(run_dir, prompts_file, tmp_path / "r", *args, TEST_KEY="test-key")
        assert code == 0 and "6 cached" in out, err
        assert sum(server.requests.values()) == asked  # nothing paid twice
    for path in (tmp_path / "r").iterdir():
        assert "test-key" not in path.read_text(errors="replace")  # the key is never written


def test_compare_shows_the_story_metrics_of_judged_runs(run_dir, prompts_file, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("judge"))
    assert judge(other, prompts_file, other / "judge")[0] == 0
    code, _, err = cli("compare", run_dir, other, "--out", tmp_path / "cmp")
    assert code == 0, err
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Stories (judge reports)" in report
    stories = report.split("## Stories (judge reports)")[1]
    line = next(line for line in stories.splitlines() if line.startswith("| `other`"))
    metrics = json.loads((other / "judge" / "report.json").read_text())["metrics"]
    assert "3 × 2" in line and f"{metrics['words']['mean']:.2f} [" in line
    assert not any(line.startswith("| `run`") for line in stories.splitlines())  # not judged: not listed


def test_the_evaluator_judges_a_model_in_memory(run_dir, prompts_file, tmp_path, bpe):
    from gpt_tinystories.evaluate import Evaluator

    assert judge(run_dir, prompts_file, tmp_path)[0] == 0
    cli_report = json.loads((tmp_path / "report.json").read_text())
    teller = load(run_dir)
    evaluator = Evaluator.from_data(sample("fixture-5-stories.txt"), teller.tokenizer, 64)
    report = evaluator.judge(teller.model, str(prompts_file), samples=2, max_new_tokens=12, seed=3)
    assert report["metrics"] == cli_report["metrics"]


def test_bad_input_is_one_line_exit_2_and_loses_nothing(run_dir, prompts_file, tmp_path):
    def fails(message, *args, out=tmp_path / "bad", **env):
        code, stdout, err = judge(run_dir, args[0] if args else prompts_file, out, *args[1:], **env)
        assert code == 2 and err.startswith("gpt-tinystories: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err

    (tmp_path / "dict.yaml").write_text("prompts: [a, b]\n")
    fails("holds a dict, not a list of prompts", tmp_path / "dict.yaml")
    (tmp_path / "empty.json").write_text("[]")
    fails("holds no prompts", tmp_path / "empty.json")
    fails(r"prompt 1 has \d+ tokens, and the model's context is 64", "tinystories-44")
    fails("--samples must be at least 1", prompts_file, "--samples", "0")
    fails("greedy decoding .* writes the same story every time", prompts_file, "--temperature", "0")
    fails("temperature must be >= 0 and finite", prompts_file, "--temperature", "inf")
    fails(r"seed must be in \[0, 2\*\*63\), got -1", prompts_file, "--seed", "-1")
    fails("API key variable NO_SUCH_KEY is not set", prompts_file, "--judge-url", "http://127.0.0.1:9/v1",
          "--judge-model", "m", "--judge-api-key-env", "NO_SUCH_KEY")  # fmt: skip
    assert not (tmp_path / "bad").exists()  # each failed before writing anything
    # a judge that cannot be reached: the completions and an earlier report stay as they were
    out = tmp_path / "kept"
    assert judge(run_dir, prompts_file, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    fails("cannot reach the judge at http://127.0.0.1:", prompts_file, "--judge-url", f"http://127.0.0.1:{port}/v1",
          "--judge-model", "m", "--judge-api-key-env", "TEST_KEY", "--judge-retries", "0", out=out,
          TEST_KEY="k")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
