"""PNG plots of a run folder: accuracy, loss, bytes and (under DP) epsilon per round; the
final per-client accuracies (histogram, global vs personalized scatter); each client's
label distribution; new-client accuracy after k adaptation steps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a metafed run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_name(run_dir: Path) -> str:
    """"algorithm on dataset" from the run's config.yaml (the folder name if unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        algorithm = cfg["algorithm"]  # a name, or {name: ..., its parameters}
        return f"{algorithm['name'] if isinstance(algorithm, dict) else algorithm} on {cfg['dataset']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return run_dir.name


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if key in r]
    return [r["round"] for r in kept], [r[key] for r in kept]


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's plots next to its metrics; returns the files written."""
    rows = read_rows(run_dir)
    if not any("global_accuracy" in r or "personalized_accuracy" in r for r in rows):
        raise ValueError(f"{run_dir} has no evaluated round yet: nothing to plot (evaluation runs every "
                         "--eval-every rounds and at the last)")
    name = run_name(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy", "personalized"),
                       ("personalized_accuracy_p10", "personalized, 10th pct client")):
        if key in rows[-1]:
            ax.plot(*series(rows, key), label=label)
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{name}: global vs personalized accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, run_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "local training loss"), ("global_train_loss", "global model, train data"),
                       ("global_loss", "global model, test data")):
        if key in rows[-1]:
            ax.plot(*series(rows, key), label=label)
    ax.set(xlabel="round", ylabel="loss", title=f"{name}: loss per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, run_dir / "loss.png"))

    written.append(_per_round(rows, name, run_dir / "bytes.png", "MB per round",
                              (("bytes_up", "up (clients to server)"), ("bytes_down", "down")), scale=1e-6))
    if any("epsilon" in r for r in rows):
        written.append(_per_round(rows, name, run_dir / "epsilon.png", "epsilon spent (cumulative)",
                                  (("epsilon", "epsilon"),)))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    per_client = summary.get("per_client_accuracy", {})
    if per_client.get("global"):
        written += _per_client_accuracy(per_client, name, run_dir)
    if summary.get("client_label_counts"):
        written.append(_label_distribution(summary["client_label_counts"], name, run_dir / "client_labels.png"))

    ks = sorted(int(k.rsplit("_k", 1)[1]) for k in rows[-1] if k.startswith("new_client_accuracy_k"))
    if ks:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ks, [rows[-1][f"new_client_accuracy_k{k}"] for k in ks], marker="o")
        ax.set(xlabel="adaptation steps k", ylabel="test accuracy", title=f"{name}: new clients, final round")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, run_dir / "new_clients.png"))
    return written


def _per_round(rows: list[dict], name: str, path: Path, ylabel: str, keys, scale: float = 1.0) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in keys:
        rounds, values = series(rows, key)
        ax.plot(rounds, [v * scale for v in values], label=label)
    ax.set(xlabel="round", ylabel=ylabel, title=f"{name}: {ylabel}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _per_client_accuracy(per_client: dict, name: str, run_dir: Path) -> list[Path]:
    """Final-round histogram (step outlines, so the two distributions stay readable where
    they overlap) and, with personalization, each client's global vs personalized accuracy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in (("global", "tab:blue"), ("personalized", "tab:orange")):
        if key in per_client:
            ax.hist(per_client[key], bins=20, range=(0, 1), histtype="stepfilled", alpha=0.25, color=color)
            ax.hist(per_client[key], bins=20, range=(0, 1), histtype="step", linewidth=2, color=color,
                    label=f"{key} (median {sorted(per_client[key])[len(per_client[key]) // 2]:.2f})")
    ax.set(xlabel="client test accuracy", ylabel="clients", title=f"{name}: per-client accuracy (final round)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    written = [save_figure(fig, run_dir / "client_accuracy_hist.png")]
    if "personalized" in per_client:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(per_client["global"], per_client["personalized"], s=14, alpha=0.7)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="no gain")
        gained = sum(p > g for g, p in zip(per_client["global"], per_client["personalized"]))
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="global model accuracy", ylabel="personalized accuracy",
               title=f"{name}: per client, final round\n{gained} of {len(per_client['global'])} clients gain")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, run_dir / "client_scatter.png"))
    return written


def _label_distribution(counts: list[list[int]], name: str, path: Path) -> Path:
    """Each client's training labels as a stacked bar of class shares (clients in id order)."""
    import numpy as np

    table = np.asarray(counts, dtype=float)  # [clients, classes]
    shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(6, min(16, 0.12 * len(table))), 4))
    bottom = np.zeros(len(table))
    colors = plt.get_cmap("tab20" if table.shape[1] <= 20 else "nipy_spectral", table.shape[1])
    for c in range(table.shape[1]):
        ax.bar(range(len(table)), shares[:, c], bottom=bottom, width=1.0, color=colors(c), linewidth=0)
        bottom += shares[:, c]
    ax.set(xlabel="client", ylabel="share of training labels", xlim=(-0.5, len(table) - 0.5), ylim=(0, 1),
           title=f"{name}: label distribution, clients 0-{len(table) - 1} ({table.shape[1]} classes)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
