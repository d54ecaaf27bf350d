"""Compare run folders: overlaid accuracy and loss curves and a table (final, best, rounds
to a target accuracy), and the mean ± std of a run repeated over seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metafed.plots import read_rows, save_figure, series

CURVES = (("global_accuracy", "global test accuracy"), ("personalized_accuracy", "personalized test accuracy"),
          ("train_loss", "training loss"))
SUMMARY_KEYS = ("global_accuracy", "personalized_accuracy", "personalized_accuracy_p10", "train_loss")


def _label(run_dir: Path) -> str:
    return run_dir.name or str(run_dir)


def compare_runs(run_dirs: list[Path], out: Path, target: float = 0.8) -> tuple[str, list[Path]]:
    """Write ``compare_<metric>.png`` per curve and ``compare.md`` into ``out``; returns the
    markdown table and the files. Runs without a metric are left out of its plot."""
    import matplotlib.pyplot as plt

    runs = {_label(d): read_rows(d) for d in run_dirs}
    if not any(runs.values()):
        raise ValueError("none of these runs has an evaluated round yet: nothing to compare")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in runs.items():
            rounds, values = series(rows, key)
            if rounds:
                ax.plot(rounds, values, label=label)
        ax.set(xlabel="round", ylabel=title, title=f"{title} per round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out / f"compare_{key}.png"))
    lines = [f"| run | final global | best global | final personalized | best personalized | "
             f"rounds to global {target:g} |", "|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        glob, pers = series(rows, "global_accuracy")[1], series(rows, "personalized_accuracy")[1]
        reached = [r["round"] for r in rows if r.get("global_accuracy", -1.0) >= target]
        cell = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {label} | {cell(glob[-1] if glob else None)} | {cell(max(glob) if glob else None)} | "
                     f"{cell(pers[-1] if pers else None)} | {cell(max(pers) if pers else None)} | "
                     f"{reached[0] if reached else 'not reached'} |")
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(table)
    return table, [*written, out / "compare.md"]


def summarize_seeds(run_dirs: list[Path], out: Path) -> dict:
    """Mean and std over the runs' final evaluated rows, written to ``out/seeds.json``."""
    finals = [read_rows(d)[-1] for d in run_dirs]
    summary = {"runs": [str(d) for d in run_dirs]}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in finals if key in r]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    return summary
