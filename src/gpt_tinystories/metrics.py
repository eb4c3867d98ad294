"""What a run reports: a log file and the console, metrics.jsonl, a loss-curve PNG, optionally W&B."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from . import atomic
from .errors import UserError

METRICS, LOG, PLOT = "metrics.jsonl", "train.log", "loss.png"

write_text_atomic = atomic.write_text  # the name older code imports from here


class RunLog:
    def __init__(self, run_dir: Path, resume_step: int | None, wandb_config: dict | None = None) -> None:
        self.run_dir = run_dir
        self.records: list[dict] = []
        path = run_dir / METRICS
        if resume_step is not None and path.is_file():
            # Keep what led up to the checkpoint; steps after it will be trained (and logged) again.
            old = [_parse(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]
            self.records = [r for r in old if r is not None and r["step"] <= resume_step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.metrics = open(path, "a")  # noqa: SIM115 - closed in close()
        self.log_file = open(run_dir / LOG, "a")  # noqa: SIM115 - closed in close()
        self.wandb = _start_wandb(run_dir, wandb_config) if wandb_config is not None else None

    def record(self, record: dict) -> None:
        self.records.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=record["step"])

    def print(self, message: str) -> None:
        tqdm.write(message)
        sys.stdout.flush()  # show progress at once in logs (stdout to a file is block-buffered)
        self.log_file.write(message + "\n")
        self.log_file.flush()

    def plot(self) -> None:
        """Train and validation loss against tokens, rewritten in place."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if train:
            ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="train")
        if evals:
            ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation")
            last = evals[-1]
            ax.set_title(f"step {last['step']}: val loss {last['val_loss']:.3f}, {last['val_bpb']:.3f} bits/byte")
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, self.run_dir / PLOT)

    def close(self) -> None:
        self.metrics.close()
        self.log_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, config: dict):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs Weights & Biases: pip install 'gpt-tinystories[wandb]'") from None
    id_file = run_dir / "wandb-id.txt"  # the same W&B run continues when training resumes
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    atomic.write_text(id_file, run_id)
    return wandb.init(project=config.get("wandb_project"), config=config, dir=str(run_dir), id=run_id,
                      resume="allow", name=run_dir.name)  # fmt: skip


def _parse(line: str) -> dict | None:
    """A record, or None for the line a crash cut off mid-write (records are appended, not replaced)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure under a temporary name, then rename it into place, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic.replacing(path, keep_suffix=True) as tmp:  # matplotlib reads the format from the suffix
            fig.savefig(tmp)
    finally:
        plt.close(fig)
