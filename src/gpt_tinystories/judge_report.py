"""The judge's reports: completions.jsonl (one completion a line, with its metrics and grade), report.json
(settings and aggregates), report.md (tables) and report.html (one self-contained page: every story, the
prompt beside its continuation, its metrics beside it). All written under a temporary name and renamed."""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path

from .atomic import write_text
from .story_metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Completion, summary

FORMAT_VERSION = 1
CI_METHOD = (f"mean over prompts of each prompt's mean over its samples; 95% interval: percentile bootstrap over "
             f"prompts ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); distinct-n: pooled over all "
             "completions, no interval")  # fmt: skip
# metric -> (label, what it measures); the order of the tables
METRICS = {
    "finished": ("finished", "share that ended with the end-of-story token within the token budget"),
    "words": ("length (words)", "words in the continuation"),
    "repeated_4gram_share": ("repeated 4-grams", "share of the continuation's word 4-grams seen earlier in it"),
    "distinct_1": ("distinct-1", "distinct words / words, over all completions"),
    "distinct_2": ("distinct-2", "distinct word pairs / pairs, over all completions"),
    "distinct_3": ("distinct-3", "distinct word triples / triples, over all completions"),
    "copied_8gram_share": ("copied 8-grams", "share of the continuation's word 8-grams found in the training stories"),
    "longest_copied_span": ("longest copied span", "longest run of words covered by training 8-grams (0: none)"),
    "prompt_names_kept": ("prompt names kept", "of the prompt's named characters, how many the continuation uses"),
    "new_names": ("new names", "named characters the continuation introduces"),
    "unknown_word_share": ("unknown words", "share of words (lower-cased) not in pyspellchecker's English dictionary"),
    "reference_nats_per_gpt2_token": ("reference nats/GPT-2 token", "the reference model's loss on the continuation"),
    "llm_grammar": ("LLM grammar", "the judge's grade, 0-10"),
    "llm_creativity": ("LLM creativity", "the judge's grade, 0-10"),
    "llm_consistency": ("LLM consistency", "the judge's grade, 0-10"),
    "llm_plot": ("LLM plot", "the judge's grade, 0-10"),
}
# the few figures `compare` shows for each run
HEADLINE = ["finished", "words", "repeated_4gram_share", "distinct_2", "copied_8gram_share", "prompt_names_kept",
            "unknown_word_share", "reference_nats_per_gpt2_token", "llm_consistency", "llm_plot"]  # fmt: skip


def build_report(completions, records, grades, config, prompts_name, teller, index) -> dict:
    from .grading import AGE_GROUPS, RUBRIC_VERSION, SCORES, grade_summary
    from .prompts import BUILTIN, NOTICE

    rows = [dict(r) for r in records]
    for row in rows:
        grade = (row.pop("grade", None) or {}).get("grade")
        if grades is not None:
            row.update({f"llm_{k}": grade[k] if grade else None for k in SCORES})
    report = {
        "format": FORMAT_VERSION,
        "model": teller.source,
        "parameters": teller.model.config.num_parameters(),  # int8/fp16 matrices are buffers
        "tokenizer": teller.tokenizer.name,
        "prompts": {
            "source": prompts_name,
            "count": len({c.prompt_index for c in completions}),
            "notice": NOTICE if prompts_name == BUILTIN else None,
        },  # fmt: skip
        "samples_per_prompt": config.samples,
        "decoding": config.decoding(),
        "ci_method": CI_METHOD,
        "metrics": summary(completions, rows),
        "index": None
        if index is None
        else {k: index.meta[k] for k in ("source", "split", "n", "stories", "words", "distinct_ngrams")},
        "reference": config.reference,
        "grading": None,
    }
    if grades is not None:
        ages = [g["grade"]["age_group"] for g in grades if "grade" in g]
        report["grading"] = {"url": config.judge.url, "model": config.judge.model, "rubric": RUBRIC_VERSION,
                             **grade_summary(grades),
                             "age_groups": {f"{k} ({v})": ages.count(k) for k, v in AGE_GROUPS.items()}}  # fmt: skip
    return report


def write_reports(out: Path, completions: list[Completion], records: list[dict], report: dict) -> None:
    lines = "".join(json.dumps({**asdict(c), "metrics": {k: v for k, v in r.items() if k != "grade"},
                                "grade": r.get("grade")}) + "\n"
                    for c, r in zip(completions, records, strict=True))  # fmt: skip
    write_text(out / "completions.jsonl", lines)
    write_text(out / "report.json", json.dumps(report, indent=2))
    write_text(out / "report.md", render_markdown(report, completions))
    write_text(out / "report.html", render_html(report, completions, records))


def cell(stat: dict | None, digits: int = 3) -> str:
    """'mean [low, high]' of a summary entry."""
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f}"
    low, high = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _settings_lines(report: dict) -> list[str]:
    decoding = ", ".join(f"{k} {v}" for k, v in report["decoding"].items() if v is not None)
    lines = [f"- model: `{report['model']}` ({report['parameters']:,} parameters, tokenizer {report['tokenizer']})",
             f"- prompts: {report['prompts']['source']} ({report['prompts']['count']} prompts, "
             f"{report['samples_per_prompt']} completion(s) each)", f"- decoding: {decoding}",
             f"- intervals: {report['ci_method']}"]  # fmt: skip
    if report["index"]:
        idx = report["index"]
        lines.append(f"- copying: word {idx['n']}-grams of {idx['source']} ({idx['stories']:,} stories, "
                     f"{idx['distinct_ngrams']:,} distinct {idx['n']}-grams)")  # fmt: skip
    if report["reference"]:
        lines.append(f"- reference model: `{report['reference']}`")
    if report["prompts"]["notice"]:
        lines.append(f"- prompts credit: {report['prompts']['notice']}")
    return lines


def _grading_lines(grading: dict | None) -> list[str]:
    if not grading:
        return ["", "No LLM grading in this run (pass --judge-url and --judge-model)."]
    errors = ", ".join(f"{k} {v}" for k, v in grading["errors"].items() if v) or "none"
    ages = ", ".join(f"{k}: {v}" for k, v in grading["age_groups"].items())
    return ["", "## LLM grading", "",
            f"Judge `{grading['model']}` at {grading['url']}, rubric {grading['rubric']}: {grading['graded']} of "
            f"{grading['requested']} completions graded ({grading['from_cache']} from the cache); not graded: "
            f"{errors}. Ungraded completions are left out of the means, never scored 0.", "",
            f"Age groups guessed: {ages}."]  # fmt: skip


def render_markdown(report: dict, completions: list[Completion]) -> str:
    lines = ["# Judge report", "", *_settings_lines(report), "", "| metric | mean [95% CI] | what it measures |",
             "|---|---|---|"]  # fmt: skip
    for key, (label, what) in METRICS.items():
        if key in report["metrics"]:
            lines.append(f"| {label} | {cell(report['metrics'][key])} | {what} |")
    lines += _grading_lines(report["grading"])
    lines += ["", "## First completions", ""]
    for c in [c for c in completions if c.sample == 0][:3]:
        ending = " `<|endoftext|>`" if c.finished else " (cut at the token budget)"
        lines += [f"> {_quote(c.prompt)} **{_quote(c.text)}**{ending}", ""]
    lines.append("Every completion with its metrics: report.html and completions.jsonl.")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return " ".join(text.replace("*", "\\*").split())


_STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
.story{display:grid;grid-template-columns:1fr 17em;gap:1em;border-top:1px solid #ddd;padding:1em 0}
.prompt{color:#666}.continuation{background:#fff3c4;color:#000;font-weight:600}
.eos{font:12px monospace;color:#0a6}.cut{font:12px monospace;color:#b00}.m td{font-size:13px;padding:.1em .4em}
.error{color:#b00}h2{margin-top:1.5em}"""


def render_html(report: dict, completions: list[Completion], records: list[dict]) -> str:
    """One page, no external files: the summary, then every story with its metrics beside it."""
    esc = html.escape
    settings = "".join(f"<li>{esc(line[2:]).replace('`', '')}</li>" for line in _settings_lines(report))
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{esc(cell(report['metrics'][key]))}</td><td>{esc(what)}</td></tr>"
                   for key, (label, what) in METRICS.items() if key in report["metrics"])  # fmt: skip
    grading = "".join(f"<p>{esc(line)}</p>" for line in _grading_lines(report["grading"]) if line and line[0] != "#")
    stories = "".join(_story_html(c, r) for c, r in zip(completions, records, strict=True))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Judge report</title>"
            f"<style>{_STYLE}</style></head><body><h1>Judge report</h1><ul>{settings}</ul>"
            f"<table><tr><th>metric</th><th>mean [95% CI]</th><th>what it measures</th></tr>{rows}</table>"
            f"<h2>LLM grading</h2>{grading}<h2>Stories</h2><p>The prompt in grey, the model's continuation "
            f"highlighted.</p>{stories}</body></html>\n")  # fmt: skip


def _story_html(c: Completion, record: dict) -> str:
    esc = html.escape
    ending = "<span class=eos>&lt;|endoftext|&gt;</span>" if c.finished else "<span class=cut>[token budget]</span>"
    metrics = "".join(f"<tr><td>{esc(METRICS[k][0])}</td><td>{esc(_value(v))}</td></tr>"
                      for k, v in record.items() if k in METRICS)  # fmt: skip
    grade = record.get("grade")
    if grade and "grade" in grade:
        g = grade["grade"]
        metrics += "".join(
            f"<tr><td>LLM {k}</td><td>{g[k]:g}</td></tr>" for k in ("grammar", "creativity", "consistency", "plot")
        )
        metrics += f"<tr><td>LLM age group</td><td>{esc(g['age_group'])}</td></tr>"
    elif grade:
        metrics += f"<tr><td>LLM grade</td><td class=error>{esc(grade['error'])}</td></tr>"
    text = f"<span class=prompt>{esc(c.prompt)}</span><span class=continuation>{esc(c.text)}</span>{ending}"
    return (f"<div class=story id=p{c.prompt_index + 1}s{c.sample + 1}><div><b>prompt {c.prompt_index + 1}, sample "
            f"{c.sample + 1}</b><div style='white-space:pre-wrap'>{text}</div></div><table class=m>{metrics}"
            f"</table></div>")  # fmt: skip


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
