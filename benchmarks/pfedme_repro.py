"""Reproduction: the pFedMe paper's settings (Dinh et al., NeurIPS 2020, arXiv:2006.08848).

Synthetic(0.5, 0.5): 100 users, n_k = (int(LogNormal(4, 2)) + 50) * 5 with NumPy seed 0
(205,795 samples), 90/10 split; MNIST: 20 users x 2 labels (shards) from the local IDX
files. Models: multinomial logistic regression (MLR) and a DNN (60-20-10 on Synthetic,
784-100-10 on MNIST). 10 clients per round, batch 20, 20 local steps per round (pFedMe's
"local epochs" are minibatch iterations), K = 5 for pFedMe. Hyperparameters follow the
pFedMe repository's README table where it gives them (FedAvg, Per-FedAvg, pFedMe) and are
our choice otherwise (listed in METHODS). Mean +- std over seeds {0, 1, 2}; the seed
changes model init, client sampling and batch order; the Synthetic data stays seed 0.

    python benchmarks/pfedme_repro.py --setting synthetic --model logistic [--rounds 200]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sweep import run_grid

# (method label, config overrides): per setting
SYNTHETIC = {
    "FedAvg": dict(algorithm="fedavg", lr=0.02),
    "Per-FedAvg (FO)": dict(algorithm="per-fedavg-fo", inner_lr=0.02, lr=0.002),
    "pFedMe": dict(algorithm="pfedme", lr=0.01, personal_lr=0.01, server_lr=2.0, pfedme_lambda=20, pfedme_steps=5),
    "Ditto": dict(algorithm="ditto", lr=0.02, personal_lr=0.02, ditto_lambda=1.0),
    "Reptile": dict(algorithm="reptile", lr=0.02, server_lr=0.5),
    "MAML": dict(algorithm="maml", inner_lr=0.02, lr=0.02),
    "Meta-SGD": dict(algorithm="meta-sgd", inner_lr=0.02, lr=0.01),
    "meta-updater": dict(algorithm="meta-updater", lr=0.02, meta_lr=0.02, meta_alpha=1.0),
}
MNIST = {
    "FedAvg": dict(algorithm="fedavg", lr=0.005),
    "Per-FedAvg (FO)": dict(algorithm="per-fedavg-fo", inner_lr=0.005, lr=0.001),
    "pFedMe": dict(algorithm="pfedme", lr=0.005, personal_lr=0.1, server_lr=1.0, pfedme_lambda=15, pfedme_steps=5),
    "Ditto": dict(algorithm="ditto", lr=0.005, personal_lr=0.005, ditto_lambda=1.0),
    "Reptile": dict(algorithm="reptile", lr=0.005, server_lr=0.5),
    "MAML": dict(algorithm="maml", inner_lr=0.005, lr=0.005),
    "Meta-SGD": dict(algorithm="meta-sgd", inner_lr=0.005, lr=0.005),
    "meta-updater": dict(algorithm="meta-updater", lr=0.005, meta_lr=0.005, meta_alpha=1.0),
}
SETTINGS = {
    "synthetic": (dict(dataset="synthetic", num_clients=100, synthetic_alpha=0.5, synthetic_beta=0.5,
                       size_multiplier=5, test_fraction=0.1), SYNTHETIC, {"logistic": [], "mlp": [20]}),
    "mnist": (dict(dataset="mnist", num_clients=20, partition="shards", shards_per_client=2, test_fraction=0.1),
              MNIST, {"logistic": [], "mlp": [100]}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", choices=SETTINGS, default="synthetic")
    ap.add_argument("--model", choices=["logistic", "mlp"], default="logistic")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/pfedme"))
    ap.add_argument("--protocol", choices=["equal-budget", "paper"], default="equal-budget",
                    help="paper: each method's own evaluation (pFedMe/Ditto stored personal models, Per-FedAvg "
                    "one step, ...); equal-budget: 5 adaptation steps for every method")
    ap.add_argument("--standardize", action="store_true", help="per-feature standardisation (pFedMe's MNIST data)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the method labels")
    ap.add_argument("--clients-per-round", type=int, default=10)
    a = ap.parse_args()
    data, methods, hidden = SETTINGS[a.setting]
    if a.methods:
        methods = {m: methods[m] for m in a.methods.split(",")}
    base = dict(**data, model=a.model, hidden=hidden[a.model] or [1], rounds=a.rounds,
                clients_per_round=a.clients_per_round, batch_size=20, local_steps=20, eval_every=10,
                eval_batch_size=20, protocol=a.protocol, standardize=a.standardize)
    if a.protocol == "equal-budget":
        base["personalize_steps"] = 5
    tag = f"{a.setting}-{a.model}" + ("-paper" if a.protocol == "paper" else "") + ("-std" if a.standardize else "")
    key = lambda m: m.replace(' ', '').replace('(', '').replace(')', '')  # noqa: E731
    grid = {f"{tag}-{key(m)}-s{s}": {**cfg, "seed": s} for m, cfg in methods.items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print(f"\n{a.setting}, {a.model}, {a.rounds} rounds, --protocol {a.protocol}"
          f"{', standardised' if a.standardize else ''}, mean ± std over {a.seeds} seeds (final round)\n")
    print("| method | global acc | personalized acc | personalized p10 |")
    print("|---|---|---|---|")
    for m in methods:
        rows = [results[k][-1] for k in grid if k.startswith(f"{tag}-{key(m)}-s")]
        cell = lambda key: f"{np.mean([r[key] for r in rows]):.4f} ± {np.std([r[key] for r in rows]):.4f}"  # noqa: E731
        print(f"| {m} | {cell('global_accuracy')} | {cell('personalized_accuracy')} | "
              f"{cell('personalized_accuracy_p10')} |")


if __name__ == "__main__":
    main()
