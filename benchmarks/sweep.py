"""Run a grid of metafed configs (one run folder each) and collect their metrics.

Used by the paper-reproduction scripts; each run is an ordinary ``metafed run``, so any
row of a table can be re-run alone with the config.yaml written in its folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from metafed.config import RunConfig
from metafed.run import run


def run_grid(out_root: Path, base: dict, grid: dict[str, dict], skip_done: bool = True) -> dict[str, list[dict]]:
    """grid: name -> config overrides. Returns name -> metrics rows. Finished runs are reused."""
    results = {}
    for name, overrides in grid.items():
        out = out_root / name
        done = out / "summary.json"
        if not (skip_done and done.exists()):
            t0 = time.perf_counter()
            run(RunConfig(**{**base, **overrides, "out": out, "progress": False}))
            print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
        results[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return results


def mean_std(values: list[float]) -> str:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.4f} ± {arr.std():.4f}" if len(arr) > 1 else f"{arr[0]:.4f}"
