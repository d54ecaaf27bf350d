"""Reproduction: LEAF FEMNIST subset (105 writers), with 20 % of writers held out as new
clients that never train: FedAvg (+ fine-tuning), Reptile, FOMAML (FedMeta), Per-FedAvg,
pFedMe and Ditto. Each method reports global accuracy, personalized accuracy on the
training writers, and new-writer accuracy after k = 0, 1, 5, 10 adaptation steps.

    METAFED_DATA=../shared/data python benchmarks/femnist_repro.py [--rounds 200] [--seeds 2]
        [--protocol paper|equal-budget] [--model small-cnn|cnn]

The default model is ``small-cnn`` (0.11 M parameters) so a round of 10 writers takes
about a second on 2 CPU cores; ``--model cnn`` is LEAF's 6.6 M-parameter CNN (~10-20 s a
round here: a GPU job).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sweep import run_grid

METHODS = {
    "FedAvg": dict(algorithm="fedavg", lr=0.05),
    "Reptile": dict(algorithm="reptile", lr=0.05, server_lr=0.5),
    "FOMAML": dict(algorithm="fomaml", inner_lr=0.05, lr=0.05),
    "Per-FedAvg (FO)": dict(algorithm="per-fedavg-fo", inner_lr=0.05, lr=0.02),
    "pFedMe": dict(algorithm="pfedme", lr=0.05, personal_lr=0.05, pfedme_lambda=15, pfedme_steps=5),
    "Ditto": dict(algorithm="ditto", lr=0.05, personal_lr=0.05, ditto_lambda=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--protocol", choices=["equal-budget", "paper"], default="equal-budget")
    ap.add_argument("--model", choices=["small-cnn", "cnn"], default="small-cnn")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the method labels")
    ap.add_argument("--out", type=Path, default=Path("results/femnist"))
    a = ap.parse_args()
    methods = {m: METHODS[m] for m in a.methods.split(",")} if a.methods else METHODS
    base = dict(dataset="femnist", model=a.model, heldout_fraction=0.2, clients_per_round=10, local_epochs=1,
                batch_size=10, rounds=a.rounds, eval_every=a.rounds, protocol=a.protocol)
    if a.protocol == "equal-budget":
        base["personalize_steps"] = 5
    tag = f"femnist-{a.model}" + ("-paper" if a.protocol == "paper" else "")
    key = lambda m: m.replace(" ", "").replace("(", "").replace(")", "")  # noqa: E731
    grid = {f"{tag}-{key(m)}-s{s}": {**cfg, "seed": s} for m, cfg in methods.items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print(f"\nFEMNIST, {a.model}, {a.rounds} rounds, --protocol {a.protocol}, mean ± std over {a.seeds} seeds\n")
    print("| method | global acc | personalized acc | new writers k=0 | k=1 | k=5 | k=10 |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        rows = [results[k][-1] for k in grid if k.startswith(f"{tag}-{key(m)}-s")]
        cell = lambda f: f"{np.mean([r[f] for r in rows]):.4f} ± {np.std([r[f] for r in rows]):.4f}"  # noqa: E731
        print(f"| {m} | {cell('global_accuracy')} | {cell('personalized_accuracy')} | "
              + " | ".join(cell(f"new_client_accuracy_k{k}") for k in (0, 1, 5, 10)) + " |")


if __name__ == "__main__":
    main()
