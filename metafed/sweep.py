"""``metafed sweep``: one config run over the Cartesian product of a grid of values, one run
folder per point, then the comparison table and curves of them all.

A sweep is restartable: its folder records the grid (``sweep.json``); run again with the
same grid, it skips finished points (``summary.json`` present), resumes interrupted ones
from their checkpoint and runs the rest. Every point is validated before the first one
starts, so a grid that holds an invalid combination fails at once, naming it.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Optional

import yaml

from metafed.config import ConfigError, RunConfig, build_config
from metafed.run_folder import write_text_atomic

SWEEP_FILE = "sweep.json"


def parse_grid(axes: list[str]) -> dict[str, list]:
    """``["lr=0.01,0.1", "algorithm=fedavg,reptile"]`` -> {"lr": [0.01, 0.1], "algorithm": [...]};
    each value is read as YAML (numbers, booleans, null)."""
    grid: dict[str, list] = {}
    for axis in axes:
        key, sep, values = axis.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {axis!r}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice: put all its values in one --grid")
        if key == "out":
            raise ConfigError("--grid out: each point's folder is chosen by the sweep (OUT/<point>)")
        try:
            grid[key] = [yaml.safe_load(v.strip()) for v in values.split(",")]
        except yaml.YAMLError:
            raise ConfigError(f"--grid {key}: {values!r} holds a value that is not valid") from None
        if len(set(map(str, grid[key]))) != len(grid[key]):
            raise ConfigError(f"--grid {key}: repeated values in {values!r}")
    if not grid:
        raise ConfigError("metafed sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def point_name(point: dict) -> str:
    """A readable, filesystem-safe folder name: ``lr=0.01,algorithm=fedavg``."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in text)


def plan_sweep(config: Optional[Path], base: dict, grid: dict[str, list], out: Path) -> list[tuple[str, RunConfig]]:
    """Every point's validated config, in grid order; raises ConfigError naming a bad point."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    plan = []
    for point in points:
        name = point_name(point)
        try:
            cfg = build_config(config, **{**base, **point, "out": out / name})
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        plan.append((name, cfg))
    return plan


def run_sweep(plan: list[tuple[str, RunConfig]], grid: dict[str, list], out: Path, target: float,
              echo: Callable[[str], None] = print) -> str:
    """Run (or continue) the planned points; returns the comparison table."""
    from metafed.compare import compare_runs
    from metafed.run import run

    record = {"grid": grid, "points": [name for name, _ in plan]}
    marker = out / SWEEP_FILE
    if marker.exists():
        if json.loads(marker.read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(f"{out} holds a sweep over another grid ({marker}): choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a sweep folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(record, indent=1))
    for i, (name, cfg) in enumerate(plan, 1):
        folder = out / name
        if (folder / "summary.json").exists():
            echo(f"[{i}/{len(plan)}] {name}: done before, kept")
            continue
        resume = folder if (folder / "checkpoint.json").exists() else None
        echo(f"[{i}/{len(plan)}] {name}" + (": resuming" if resume else ""))
        run(cfg, resume=resume, overwrite=resume is None and folder.exists())
    table, _ = compare_runs([out / name for name, _ in plan], out, target)
    return table
