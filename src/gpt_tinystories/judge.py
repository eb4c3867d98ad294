"""`gpt-tinystories judge`: complete story beginnings with a model and judge the stories, not only the loss.

    completions  every prompt N times, batched (sampling), or once (greedy / beam search)
    metrics      story_metrics.py per completion, with the training n-gram index when given training data
    reference    reference.py: another model's nats per GPT-2 token of each continuation
    grades       grading.py: an LLM's grades over an OpenAI-compatible endpoint
    reports      completions.jsonl, report.json, report.md, report.html (judge_report.py) in --out

Completions are written before any grading, with the settings that made them: a run that stops later (an
unreachable judge, Ctrl-C) leaves them, and the same command reuses them instead of generating again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import write_text
from .errors import UserError
from .grading import Judge
from .prompts import load_prompts
from .story_metrics import Completion

COMPLETIONS, GENERATION = "completions.jsonl", "generation.json"


@dataclass
class JudgeConfig:
    """What `gpt-tinystories judge` does; the defaults are the README's (sampling at temperature 1)."""

    checkpoint: str = ""  # a run dir, checkpoint folder or transformers model (judge_stories() takes a model)
    out: str | None = None  # default: RUN_DIR/judge for a run dir
    prompts: str | None = None  # default: the shipped 44
    samples: int = 10
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    beams: int | None = None
    seed: int = 0
    batch_size: int = 110
    train_data: str | None = None  # index its word 8-grams for the copying metrics
    train_split: str = "train"
    index_dir: str | None = None
    reference: str | None = None
    judge: Judge | None = None
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if self.samples < 1:
            raise UserError(f"--samples must be at least 1, got {self.samples}")
        from .engine import Sampling
        from .generate import check_seed

        Sampling(self.temperature, self.top_k, self.top_p)  # its checks
        check_seed(self.seed)
        if (self.beams or self.temperature == 0) and self.samples > 1:
            how = f"beam search (--beams {self.beams})" if self.beams else "greedy decoding (--temperature 0)"
            raise UserError(f"{how} writes the same story every time: pass --samples 1, or sample at a temperature")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be at least 1")

    def decoding(self) -> dict:
        if self.beams:
            return {"strategy": "beam", "beams": self.beams, "max_new_tokens": self.max_new_tokens}
        strategy = "greedy" if self.temperature == 0 else "sample"
        return {"strategy": strategy, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "batch_size": self.batch_size}  # fmt: skip


def default_out(checkpoint: str) -> Path:
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        return path / "judge"
    raise UserError(f"pass --out DIR for the judge's reports ({checkpoint} is not a run dir to write them into)")


def run(config: JudgeConfig) -> dict:
    """Complete, measure, score and grade; write the reports into the out dir; return report.json's content."""
    from . import load

    config.check()
    prompts, prompts_name = load_prompts(config.prompts)
    if config.judge is not None:
        config.judge.api_key()  # a missing key fails now, not after minutes of generation
    out = Path(config.out) if config.out else default_out(config.checkpoint)
    teller = load(config.checkpoint, config.device)
    _check_lengths(teller, prompts)
    index = None
    if config.train_data:
        from .ngram_index import open_or_build

        index = open_or_build(config.train_data, config.train_split, 8, config.index_dir, config.progress)
    out.mkdir(parents=True, exist_ok=True)
    return judge_stories(teller, prompts, prompts_name, config, index, out)


def judge_stories(teller, prompts: list[str], prompts_name: str, config: JudgeConfig, index=None,
                  out: Path | None = None) -> dict:  # fmt: skip
    """The judge's work on a model in memory (a `Storyteller`): report.json's content. With `out`, the
    completions are written there before any grading (or reused from there) and the reports after."""
    from .judge_report import build_report, write_reports

    config.check()
    _check_lengths(teller, prompts)
    started = time.perf_counter()
    if out is None:
        completions, reused = _generate(teller, prompts, config), False
    else:
        completions, reused = _completions(teller, prompts, config, out)
    generation_seconds = time.perf_counter() - started
    records = _measure(completions, index, config)
    grades = None
    if config.judge is not None:
        grades = _grade(completions, config)
        for record, grade in zip(records, grades, strict=True):
            record["grade"] = grade
    report = build_report(completions, records, grades, config, prompts_name, teller, index)
    report["generation"] = {"seconds": round(generation_seconds, 3), "reused": reused,
                            "tokens": sum(c.tokens for c in completions)}  # fmt: skip
    if out is not None:
        write_reports(out, completions, records, report)
    return report


def _check_lengths(teller, prompts: list[str]) -> None:
    context = teller.model.config.context_length
    for number, prompt in enumerate(prompts, 1):
        tokens = len(teller.encode_prompt(prompt))
        if tokens >= context:
            raise UserError(f"prompt {number} has {tokens} tokens, and the model's context is {context}: a "
                            "prompt must leave room for the story; shorten it or drop it from --prompts")  # fmt: skip


def _generation_key(teller, prompts: list[str], config: JudgeConfig) -> dict:
    """Everything that decides the completions: equal keys, equal completions."""
    weights = Path(teller.source) / "model.safetensors"
    meta_file = Path(teller.source) / "meta.json"
    model_id = hashlib.sha256(meta_file.read_bytes()).hexdigest() if meta_file.is_file() else str(weights)
    return {"model": teller.source, "model_meta_sha256": model_id, "device": str(teller.model.wte.weight.device),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "samples": config.samples, **config.decoding()}  # fmt: skip


def _completions(teller, prompts: list[str], config: JudgeConfig, out: Path) -> tuple[list[Completion], bool]:
    """The completions in `out` when they were made by the same model and settings, else new ones (written
    to `out` at once)."""
    key = _generation_key(teller, prompts, config)
    old = _read_completions(out, key, len(prompts) * config.samples)
    if old is not None:
        return old, True
    completions = _generate(teller, prompts, config)
    lines = "".join(json.dumps(asdict(c)) + "\n" for c in completions)
    write_text(out / COMPLETIONS, lines)
    write_text(out / GENERATION, json.dumps(key, indent=2))
    return completions, False


def _read_completions(out: Path, key: dict, count: int) -> list[Completion] | None:
    try:
        if json.loads((out / GENERATION).read_text()) != key:
            return None
        fields = Completion.__dataclass_fields__
        rows = [json.loads(line) for line in (out / COMPLETIONS).read_text().splitlines() if line.strip()]
        completions = [Completion(**{k: v for k, v in row.items() if k in fields}) for row in rows]
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    return completions if len(completions) == count else None


def _generate(teller, prompts: list[str], config: JudgeConfig) -> list[Completion]:
    from .generate import Sampling, beam_search, generate

    eos, model = teller.tokenizer.eos_id, teller.model
    jobs = [(p, s) for p in range(len(prompts)) for s in range(config.samples)]
    bar = tqdm(total=len(jobs), unit="story", desc="complete", leave=False, disable=None if config.progress else True)
    outputs: list[list[int]] = []
    sampling = Sampling(config.temperature, config.top_k, config.top_p)
    for start in range(0, len(jobs), 1 if config.beams else config.batch_size):
        batch = jobs[start : start + (1 if config.beams else config.batch_size)]
        rows = [teller.encode_prompt(prompts[p]) for p, _ in batch]
        if config.beams:
            outputs.append(beam_search(model, rows[0], config.max_new_tokens, config.beams, eos))
        else:  # a generator per batch, seeded by (seed, batch): the same seed and batch size give the same stories
            generator = torch.Generator(model.wte.weight.device).manual_seed((config.seed * 1_000_003 + start) % 2**63)
            outputs += generate(model, rows, config.max_new_tokens, sampling, eos, generator)
        bar.update(len(batch))
    bar.close()
    return [
        Completion(
            p,
            s,
            prompts[p],
            teller.tokenizer.decode([t for t in tokens if t != eos]),
            len(tokens),
            bool(tokens) and tokens[-1] == eos,
        )  # fmt: skip
        for (p, s), tokens in zip(jobs, outputs, strict=True)
    ]


def _measure(completions: list[Completion], index, config: JudgeConfig) -> list[dict]:
    """Per-completion metrics, with the reference model's score when one is given."""
    from .story_metrics import completion_metrics, spelling

    records = [completion_metrics(c, index, spelling) for c in completions]
    if config.reference:
        from .reference import Reference

        reference = Reference(config.reference, config.device)
        for record, score in zip(records, reference.scores(completions), strict=True):
            record["reference_nats_per_gpt2_token"] = score
    return records


def _grade(completions: list[Completion], config: JudgeConfig) -> list[dict]:
    from .grading import grade_all

    bar = tqdm(total=len(completions), unit="story", desc="grade", leave=False,
               disable=None if config.progress else True)  # fmt: skip
    try:
        return grade_all(config.judge, [(c.prompt, c.text) for c in completions], lambda: bar.update(1))
    finally:
        bar.close()
