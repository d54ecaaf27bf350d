"""Run outputs: metrics.jsonl (one object per logged round), metrics.csv, clients.csv (each
evaluated client's scores at each evaluation), summary.json."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from metafed.eval import HELDOUT_ADAPT_STEPS
from metafed.run_folder import open_nofollow, write_text_atomic

log = logging.getLogger("metafed")

CLIENTS_FILE = "clients.csv"
CLIENT_COLUMNS = ["round", "client", "kind", "global_accuracy", "personalized_accuracy",
                  *[f"new_k{k}" for k in HELDOUT_ADAPT_STEPS]]


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
            (self.run_dir / CLIENTS_FILE).unlink(missing_ok=True)

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
        self._truncate_clients(last_round)

    def _truncate_clients(self, last_round: int) -> None:
        path = self.run_dir / CLIENTS_FILE
        if not path.exists():
            return
        lines = path.read_text(errors="replace").splitlines()
        first = [line.split(",", 1)[0] for line in lines[1:]]
        kept = [line for line, rnd in zip(lines[1:], first) if rnd.isdigit() and int(rnd) <= last_round]
        write_text_atomic(path, "".join(line + "\n" for line in [",".join(CLIENT_COLUMNS), *kept]))

    def log_clients(self, rnd: int, per_client: dict) -> None:
        """Append one clients.csv row per evaluated client: training clients' global and
        personalized accuracy, held-out clients' accuracy after k adaptation steps."""
        if not self.run_dir or "client" not in per_client:
            return
        rows = [{"round": rnd, "client": name, "kind": "train", "global_accuracy": g, "personalized_accuracy": p}
                for name, g, p in zip(per_client["client"], per_client.get("global", [float("nan")] * len(
                    per_client["client"])), per_client["personalized"])]
        for j, name in enumerate(per_client.get("new_client", [])):
            rows.append({"round": rnd, "client": name, "kind": "new",
                         **{f"new_k{k}": per_client[f"new_client_k{k}"][j] for k in HELDOUT_ADAPT_STEPS
                            if f"new_client_k{k}" in per_client}})
        path = self.run_dir / CLIENTS_FILE
        fresh = not path.exists()
        with open_nofollow(path, "a") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, lineterminator="\n")
            if fresh:
                writer.writeheader()
            writer.writerows(rows)

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
