"""Side-by-side comparison of training runs: a markdown report and validation-loss plots.

`compare(run_dirs, out)` reads what each run dir already holds (config.json, metrics.jsonl) and writes
`report.md` with `val_loss_tokens.png` and `val_loss_time.png` into `out`. Nothing is recomputed, so runs made
on different machines compare as they were measured. With `data`, each run's best checkpoint is also scored
by the same `Evaluator` on that data, so runs validated on different data still compare fairly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text
from .config import ModelConfig
from .errors import UserError
from .metrics import save_figure

REPORT, BY_TOKENS, BY_TIME = "report.md", "val_loss_tokens.png", "val_loss_time.png"


@dataclass
class Run:
    name: str
    path: Path
    settings: dict  # the resolved train config, with the model's fields (model: prefix) and the precision
    parameters: int
    evals: list[dict]
    last_train: dict | None
    judge: dict | None = None  # RUN_DIR/judge/report.json, when `gpt-tinystories judge` has run

    @property
    def final(self) -> dict | None:
        return self.evals[-1] if self.evals else None


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    config_file, metrics_file = path / "config.json", path / "metrics.jsonl"
    if not config_file.is_file() or not metrics_file.is_file():
        raise UserError(f"{path} is not a run dir (no config.json and metrics.jsonl); pass the --out of a train run")
    try:
        config = json.loads(config_file.read_text())
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        model = ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: cannot read config.json or metrics.jsonl ({error}); is the run dir intact?") from None
    # The model as built, not the train config's overrides of it (None there means "the preset's").
    model_fields = set(config["model"])
    settings = {k: v for k, v in config["train"].items() if k not in model_fields}
    settings |= {f"model:{k}": v for k, v in config["model"].items()}
    settings["precision (measured)"] = config.get("precision")
    settings["attention precision (measured)"] = config.get("attention_precision")
    trains = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    run = Run(path.name, path, settings, model.num_parameters(), evals, trains[-1] if trains else None)
    run.judge = _judge_report(path)
    return run


def _judge_report(path: Path) -> dict | None:
    report = path / "judge" / "report.json"
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{report} is damaged; run 'gpt-tinystories judge --checkpoint {path}' again") from None


def compare(
    run_dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    split: str = "validation",
    batch_size: int = 16,
    max_batches: int | None = None,
    stride: int | None = None,
) -> Path:
    """Write the report and plots for `run_dirs` into `out`; return the report's path. With `data`, the report
    also scores every run's best checkpoint on it (see `score`), with `stride` in sliding windows."""
    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run dirs")
    if stride is not None and data is None:
        raise UserError("--stride sets how --data is scored; add --data FILE")
    runs = [load_run(path) for path in run_dirs]
    scores = score(runs, data, split, batch_size, max_batches, stride) if data is not None else None
    names = [run.name for run in runs]
    for run in runs:  # two runs named alike (a/seed1, b/seed1): name them by their parent too
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, "tokens", 1e6, "tokens (millions)", out / BY_TOKENS)
    _plot(runs, "seconds", 60, "training time (minutes)", out / BY_TIME)
    report = out / REPORT
    write_text(report, render(runs) + (render_scores(runs, scores, data, split, stride) if scores else ""))
    return report


def score(
    runs: list[Run], data: str | os.PathLike, split: str, batch_size: int, max_batches: int | None,
    stride: int | None = None,
) -> list:  # fmt: skip
    """Each run's best checkpoint scored by an `Evaluator` on the same text, in windows of the shortest context
    among the runs (a longer context lowers the loss by itself), with `stride` in sliding windows; one
    `EvalResult` per run."""
    from .checkpoint import load_model
    from .evaluate import Evaluator

    context = min(run.settings["model:context_length"] for run in runs)
    results = []
    for run in runs:  # one model in memory at a time
        model, tokenizer, _ = load_model(run.path)
        evaluator = Evaluator.from_data(data, tokenizer, context, split, batch_size=batch_size,
                                        max_batches=max_batches, stride=stride)  # fmt: skip
        results.append(evaluator.evaluate(model))
    return results


def render_scores(runs: list[Run], scores: list, data: str | os.PathLike, split: str, stride: int | None = None) -> str:
    context = min(run.settings["model:context_length"] for run in runs)
    sliding = f", each scored {stride} targets at a time after the tokens before them" if stride else ""
    lines = [
        "",
        "## On the same data",
        "",
        f"Each run's best checkpoint scored by the same evaluator on `{data}` (split `{split}` for a hub "
        f"dataset), in windows of {context} tokens{sliding}: bits per byte and nats per GPT-2 token compare across "
        "tokenizers, loss per token only between runs with the same tokenizer.",
        "",
        "| run | text bytes | loss (nats/token) | bits/byte | nats/GPT-2 token |",
        "|---|---|---|---|---|",
    ]
    for run, result in zip(runs, scores, strict=True):
        lines.append(f"| `{run.name}` | {result.text_bytes:,} | {result.loss:.4f} | {result.bits_per_byte:.4f} | "
                     f"{_number(result.nats_per_gpt2_token, '.4f')} |")  # fmt: skip
    best = min(zip(runs, scores, strict=True), key=lambda pair: pair[1].bits_per_byte)[0]
    return "\n".join([*lines, "", f"Lowest bits per byte on this data: **`{best.name}`**.", ""])


def render(runs: list[Run]) -> str:
    lines = [
        f"# Comparison of {len(runs)} runs",
        "",
        "Final validation figures are those of each run's last evaluation (on its own validation windows: "
        "compare runs evaluated on the same data). Tokens/s is the run's average over its training time; peak "
        "memory is the process's peak resident set on a CPU, or peak allocated GPU memory.",
        "",
        "| run | parameters | tokens | val loss (nats/token) | bits/byte | nats/GPT-2 token | tokens/s | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        final, train = run.final or {}, run.last_train or {}
        speed = train["tokens"] / train["seconds"] if train.get("seconds") else None
        cells = [
            f"`{run.name}`",
            f"{run.parameters:,}",
            f"{final['tokens']:,}" if final else "no evaluation",
            _number(final.get("val_loss"), ".4f"),
            _number(final.get("val_bpb"), ".4f"),
            _number(final.get("val_nats_per_gpt2_token"), ".4f"),
            _number(speed, ",.0f"),
            _number(train.get("peak_memory_mb"), ",.0f", " MB"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    best = min((r for r in runs if r.final), key=lambda r: r.final["val_bpb"], default=None)
    if best is not None:
        lines += ["", f"Lowest bits per byte: **`{best.name}`**."]
    keys = [k for k in runs[0].settings if len({json.dumps(r.settings.get(k)) for r in runs}) > 1]
    keys += sorted({k for r in runs for k in r.settings} - set(runs[0].settings))
    lines += ["", "## Settings that differ", ""]
    if keys:
        lines += ["| setting | " + " | ".join(f"`{r.name}`" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for key in keys:
            lines.append(f"| **{key}** | " + " | ".join(f"`{r.settings.get(key)!r}`" for r in runs) + " |")
    else:
        lines.append("None: the runs share every setting.")
    lines += _story_lines(runs)
    lines += ["", "## Validation loss", "", f"![by tokens]({BY_TOKENS})", "", f"![by time]({BY_TIME})", ""]
    return "\n".join(lines)


def _story_lines(runs: list[Run]) -> list[str]:
    """The judge's headline story metrics of the runs that have a report (RUN_DIR/judge/report.json)."""
    from .judge_report import HEADLINE, METRICS, cell

    judged = [run for run in runs if run.judge]
    if not judged:
        return []
    keys = [k for k in HEADLINE if any(k in run.judge["metrics"] for run in judged)]
    lines = ["", "## Stories (judge reports)", "", "Means over prompts with 95% bootstrap intervals (see each "
             "run's judge/report.md); read them only across runs judged with the same prompts and decoding.", "",
             "| run | prompts × samples | decoding | " + " | ".join(METRICS[k][0] for k in keys) + " |",
             "|---" * (len(keys) + 3) + "|"]  # fmt: skip
    for run in judged:
        report = run.judge
        decoding = ", ".join(f"{k} {v}" for k, v in report["decoding"].items() if v is not None and k != "batch_size")
        shape = f"{report['prompts']['count']} × {report['samples_per_prompt']}"
        cells = [cell(report["metrics"].get(k), 2) for k in keys]
        lines.append(f"| `{run.name}` | {shape} | {decoding} | " + " | ".join(cells) + " |")
    return lines


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _plot(runs: list[Run], x_key: str, scale: float, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for run in runs:
        points = [(r[x_key] / scale, r["val_loss"]) for r in run.evals if r.get(x_key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, label=run.name)
    ax.set_xlabel(label)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
