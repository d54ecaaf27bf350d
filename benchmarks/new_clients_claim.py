"""The central claim of the project's seed documents: meta-learning makes *new* clients adapt
faster and better than fine-tuning a FedAvg model. Tested on a label-skewed MNIST federation
(shards: 2 labels per client), with 20 % of the clients held out: they never train and are
scored after k = 0, 1, 5, 10 SGD steps on their own train split.

A second setting, ``--setting synthetic`` (Synthetic(1, 1), multinomial logistic
regression), gives every client its own true model, so one global model cannot serve them.

Methods, each under its paper protocol (``--protocol paper``): FedAvg (+ fine-tuning),
Reptile (annealed), FOMAML (FedMeta: one episode per round, Adam at the server) and
Per-FedAvg (FO). The grid varies what the claim depends on: the adaptation rate (the rate
the new client fine-tunes with: ``personalize_lr`` for FedAvg/Reptile, alpha = ``inner_lr``
for FOMAML/Per-FedAvg, which trained for it), and FOMAML's episodes per round
(``local_steps`` 1 as in FedMeta, or 5).

    METAFED_DATA=../shared/data python benchmarks/new_clients_claim.py [--setting mnist|synthetic] [--rounds 150] [--seeds 2]

Prints one table (mean ± std over seeds, final round); docs/benchmarks.md reads it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sweep import run_grid


# (data and model, the table's title): MNIST's tasks share one labelling (a global model can
# serve them all); Synthetic(1, 1) gives each client its own model (tasks conflict)
SETTINGS = {
    "mnist": (dict(dataset="mnist", model="mlp", hidden=[100], num_clients=50, partition="shards",
                   shards_per_client=2, standardize=True), "MNIST shards (2 labels/client), 50 clients, 10 held out"),
    "synthetic": (dict(dataset="synthetic", model="logistic", num_clients=50, synthetic_alpha=1.0,
                       synthetic_beta=1.0), "Synthetic(1, 1), MLR, 50 clients, 10 held out"),
}


def methods(rate: float) -> dict[str, dict]:
    """Every method adapts new clients at ``rate``; the training rates are fixed."""
    return {
        "FedAvg + fine-tuning": dict(algorithm="fedavg", lr=0.05, personalize_lr=rate),
        "Reptile": dict(algorithm="reptile", lr=0.05, server_lr=1.0, personalize_lr=rate),
        "FOMAML, 1 episode": dict(algorithm="fomaml", inner_lr=rate),  # Adam at the server, lr 0.01
        "FOMAML, 5 episodes": dict(algorithm="fomaml", inner_lr=rate, local_steps=5, lr=0.05,
                                   server_optimizer="sgd", server_lr=1.0),
        "Per-FedAvg (FO)": dict(algorithm="per-fedavg-fo", inner_lr=rate, lr=0.02),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rates", default="0.01,0.05", help="adaptation rates of new clients")
    ap.add_argument("--setting", choices=SETTINGS, default="mnist")
    ap.add_argument("--out", type=Path, default=Path("results/new-clients"))
    a = ap.parse_args()
    base = dict(**SETTINGS[a.setting][0], heldout_fraction=0.2, clients_per_round=10, local_steps=20, batch_size=10,
                rounds=a.rounds, eval_every=a.rounds, eval_clients=20, protocol="paper")
    rates = [float(r) for r in a.rates.split(",")]
    key = lambda m: m.replace(" ", "").replace("(", "").replace(")", "").replace(",", "").replace("+", "")  # noqa
    tag = f"claim-{a.setting}" if a.setting != "mnist" else "claim"
    grid = {f"{tag}-{key(m)}-a{rate}-s{s}": {**cfg, "seed": s}
            for rate in rates for m, cfg in methods(rate).items() for s in range(a.seeds)}
    results = run_grid(a.out, base, grid)
    print(f"\n{SETTINGS[a.setting][1]}; {a.rounds} rounds, --protocol paper, "
          f"mean ± std over {a.seeds} seeds\n")
    print("| adaptation rate | method | global acc | new clients k=0 | k=1 | k=5 | k=10 |")
    print("|---|---|---|---|---|---|---|")
    for rate in rates:
        for m in methods(rate):
            rows = [results[k][-1] for k in grid if k.startswith(f"{tag}-{key(m)}-a{rate}-s")]
            cell = lambda f: f"{np.mean([r[f] for r in rows]):.3f} ± {np.std([r[f] for r in rows]):.3f}"  # noqa
            print(f"| {rate} | {m} | {cell('global_accuracy')} | "
                  + " | ".join(cell(f"new_client_accuracy_k{k}") for k in (0, 1, 5, 10)) + " |")


if __name__ == "__main__":
    main()
