"""The README's judge evidence: judge each run dir, then print the comparison table and two completions of each.

    python benchmarks/judge_evidence.py RUN_DIR [RUN_DIR ...] [--train-data FILE] [--reference MODEL]
        [--samples 10] [--max-new-tokens 300] [--device auto] [-- EXTRA JUDGE FLAGS, e.g. --judge-url ...]

Each run is judged with the same prompts (the paper's 44), decoding and seed into RUN_DIR/judge (a run judged
before with the same settings reuses its completions), then one markdown table shows the headline metrics of
every run side by side, and two completions of each (prompts 1 and 2, first sample) are quoted. A random
initialisation to compare with: `python benchmarks/random_init.py --out runs/random-1m`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from gpt_tinystories.judge_report import HEADLINE, METRICS, cell

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train-head.txt"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--train-data", default=str(SAMPLE))
    parser.add_argument("--reference")
    parser.add_argument("--samples", default="10")
    parser.add_argument("--max-new-tokens", default="300")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    reports = {}
    for run in args.runs:
        command = [sys.executable, "-m", "gpt_tinystories", "judge", "--checkpoint", run, "--samples", args.samples,
                   "--max-new-tokens", args.max_new_tokens, "--train-data", args.train_data, "--device", args.device,
                   *(["--reference", args.reference] if args.reference else []), *extra]  # fmt: skip
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.run(command).returncode:
            raise SystemExit(f"judging {run} failed")
        reports[run] = Path(run) / "judge"
    print(table({run: json.loads((out / "report.json").read_text()) for run, out in reports.items()}))
    for run, out in reports.items():
        rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
        print(f"\n`{Path(run).name}`:\n")
        for row in [r for r in rows if r["sample"] == 0][:2]:
            ending = " `<|endoftext|>`" if row["finished"] else " (token budget)"
            print(f"> {' '.join(row['prompt'].split())} **{' '.join(row['text'].split())}**{ending}\n")


def table(reports: dict[str, dict]) -> str:
    keys = [k for k in HEADLINE + ["distinct_1", "longest_copied_span", "new_names"]
            if any(k in r["metrics"] for r in reports.values())]  # fmt: skip
    lines = ["| metric | " + " | ".join(f"`{Path(run).name}`" for run in reports) + " |",
             "|---" * (len(reports) + 1) + "|"]  # fmt: skip
    for key in keys:
        lines.append(f"| {METRICS[key][0]} | " + " | ".join(cell(r["metrics"].get(key), 3) for r in reports.values())
                     + " |")  # fmt: skip
    first = next(iter(reports.values()))
    decoding = ", ".join(f"{k} {v}" for k, v in first["decoding"].items() if v is not None)
    lines += ["", f"{first['prompts']['count']} prompts x {first['samples_per_prompt']} samples; {decoding}; "
              f"{first['ci_method']}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
