"""Run outputs: metrics.jsonl (one object per logged round), metrics.csv, summary.json."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from metafed.run_folder import open_nofollow, write_text_atomic

log = logging.getLogger("metafed")


class RunTracker:
    """Appends metrics to ``run_dir/metrics.jsonl``; on resume, drops rows after the checkpoint."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self.rows: list[dict] = []

    @property
    def jsonl(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir else None

    def start(self) -> None:
        if self.jsonl:
            write_text_atomic(self.jsonl, "")

    def resume_from(self, last_round: int) -> None:
        """Keep the complete rows up to the checkpointed round. A torn or garbled line (power
        loss, full disk) ends the readable history: it and anything after it are dropped."""
        if not self.jsonl or not self.jsonl.exists():
            return
        kept = []
        for n, line in enumerate(self.jsonl.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                row = None
            if not isinstance(row, dict) or type(row.get("round")) is not int:
                log.warning("metrics.jsonl line %d is incomplete or corrupt: recovering to the last complete row", n)
                break
            kept.append(row)
        self.rows = [r for r in kept if r["round"] <= last_round]
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.jsonl:
            with open_nofollow(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if not self.run_dir or not self.rows:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open_nofollow(self.run_dir / "metrics.csv", "w") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def write_summary(self, summary: dict) -> None:
        if self.run_dir:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
