"""PNG plots of a run folder: accuracy and loss per round, per-client accuracy histogram,
new-client accuracy after k adaptation steps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a metafed run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_name(run_dir: Path) -> str:
    """"algorithm on dataset" from the run's config.yaml (the folder name if unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return f"{cfg['algorithm']} on {cfg['dataset']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return run_dir.name


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if key in r]
    return [r["round"] for r in kept], [r[key] for r in kept]


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's plots next to its metrics; returns the files written."""
    rows = _rows(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no evaluated round yet: nothing to plot (rows are written every "
                         "--eval-every rounds)")
    name = run_name(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy", "personalized"),
                       ("personalized_accuracy_p10", "personalized, 10th pct client")):
        if key in rows[-1]:
            ax.plot(*_series(rows, key), label=label)
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{name}: global vs personalized accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "local training loss"), ("global_train_loss", "global model, train data"),
                       ("global_loss", "global model, test data")):
        if key in rows[-1]:
            ax.plot(*_series(rows, key), label=label)
    ax.set(xlabel="round", ylabel="cross-entropy", title=f"{name}: loss per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "loss.png"))

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        per_client = json.loads(summary_path.read_text()).get("per_client_accuracy", {})
        if per_client:
            fig, ax = plt.subplots(figsize=(6, 4))
            for key in ("global", "personalized"):
                if key in per_client:
                    ax.hist(per_client[key], bins=20, range=(0, 1), alpha=0.6, label=key)
            ax.set(xlabel="client test accuracy", ylabel="clients", title=f"{name}: per-client accuracy (final)")
            ax.legend()
            written.append(_save(fig, run_dir / "client_accuracy_hist.png"))

    ks = sorted(int(k.rsplit("_k", 1)[1]) for k in rows[-1] if k.startswith("new_client_accuracy_k"))
    if ks:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ks, [rows[-1][f"new_client_accuracy_k{k}"] for k in ks], marker="o")
        ax.set(xlabel="adaptation steps k", ylabel="test accuracy", title=f"{name}: new clients, final round")
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "new_clients.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
