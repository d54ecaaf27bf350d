"""Run outputs: metrics.jsonl (one object per evaluated round), metrics.csv, summary.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path


class RunTracker:
    """Appends metrics to ``run_dir/metrics.jsonl``; on resume, drops rows after the checkpoint."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self.rows: list[dict] = []

    @property
    def jsonl(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir else None

    def resume_from(self, last_round: int) -> None:
        if not self.jsonl or not self.jsonl.exists():
            return
        kept = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        self.rows = [r for r in kept if r["round"] <= last_round]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if not self.run_dir or not self.rows:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def write_summary(self, summary: dict) -> None:
        if self.run_dir:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
