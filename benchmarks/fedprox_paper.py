"""Paper check: FedProx (Li et al., MLSys 2020, arXiv:1812.06127), Figure 1/2 setting.

Synthetic(0,0), (0.5,0.5), (1,1) and IID; 30 devices, 80/20 split per device; multinomial
logistic regression; SGD lr 0.01, batch 10, 20 local epochs, 10 devices per round;
stragglers 0 / 50 / 90 % (a straggler runs a random 1..19 epochs). FedAvg drops
stragglers; FedProx (mu = 1) keeps their partial work. The paper runs 200 rounds.

    python benchmarks/fedprox_paper.py [--rounds 200] [--seeds 2] [--out benchmarks/results/fedprox]

Writes one run folder per setting and seed, a markdown table on stdout (mean ± std over
seeds) and plots under docs/img/ (seed 0).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sweep import mean_std, run_grid  # noqa: E402

DATASETS = {"syn(0,0)": dict(synthetic_alpha=0.0, synthetic_beta=0.0),
            "syn(0.5,0.5)": dict(synthetic_alpha=0.5, synthetic_beta=0.5),
            "syn(1,1)": dict(synthetic_alpha=1.0, synthetic_beta=1.0),
            "syn-iid": dict(synthetic_alpha=0.0, synthetic_beta=0.0, synthetic_iid=True)}
METHODS = {"FedAvg": dict(algorithm="fedavg"), "FedProx mu=1": dict(algorithm="fedprox", mu=1.0)}
STRAGGLERS = (0.0, 0.5, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fedprox"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    base = dict(dataset="synthetic", model="logistic", num_clients=30, test_fraction=0.2, clients_per_round=10,
                local_epochs=20, batch_size=10, lr=0.01, rounds=a.rounds, eval_every=5, personalize_steps=0,
                backend="vectorized", compile=True, seed=0)
    grid = {f"{d}|{m}|{s}|{seed}": {**DATASETS[d], **METHODS[m], "stragglers": s, "seed": seed}
            for d in DATASETS for s in STRAGGLERS for m in METHODS for seed in range(a.seeds)}
    results = run_grid(a.out, base, {_folder(k): v for k, v in grid.items()})
    names = {_folder(k): k for k in grid}
    print(f"| dataset | stragglers | method | final train loss | final test acc | max train loss (rounds > 20) |"
          f"  ({a.rounds} rounds, mean ± std over {a.seeds} seeds)")
    print("|---|---|---|---|---|---|")
    for d in DATASETS:
        for s in STRAGGLERS:
            for m in METHODS:
                runs = [_evaluated(results[_folder(f"{d}|{m}|{s}|{seed}")], a.rounds) for seed in range(a.seeds)]
                final = [r[-1]["global_train_loss"] for r in runs]
                acc = [r[-1]["global_accuracy"] for r in runs]
                late = [max([x["global_train_loss"] for x in r if x["round"] > 20], default=float("nan")) for r in runs]
                print(f"| {d} | {s:.0%} | {m} | {mean_std(final)} | {mean_std(acc)} | {mean_std(late)} |")
    a.img.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(STRAGGLERS), len(DATASETS), figsize=(16, 13), sharex=True)
    for key, rows in results.items():
        d, m, s, seed = names[key].split("|")
        if seed != "0":
            continue
        rows = _evaluated(rows, a.rounds)
        ax = axes[STRAGGLERS.index(float(s))][list(DATASETS).index(d)]
        ax.plot([r["round"] for r in rows], [r["global_train_loss"] for r in rows], label=m)
        ax.set_title(f"{d}, {float(s):.0%} stragglers", fontsize=9)
        ax.set_ylim(0, 4)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for row in axes:
        row[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(a.img / "fedprox_training_loss.png", dpi=80)


def _folder(key: str) -> str:
    return key.replace("|", "_").replace(" ", "").replace("=", "")


def _evaluated(rows: list[dict], rounds: int) -> list[dict]:
    """Evaluated rows only; runs made with more rounds are cut to ``rounds``."""
    return [r for r in rows if r["round"] <= rounds and "global_train_loss" in r]


if __name__ == "__main__":
    main()
