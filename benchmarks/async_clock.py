"""Accuracy vs simulated wall-clock time: synchronous FedAvg against FedBuff and FedAsync, with
heavy-tailed client speeds (log-normal sigma 1, 10 % of clients 10x slower). MNIST, 100
clients, Dirichlet(0.3), MLP 784-100-10, 10 clients training at once, 20 local steps of
batch 10, lr 0.05, standardised inputs.

A synchronous round lasts as long as its slowest sampled client (the same per-client speeds,
metafed.asynchrony.client_step_times); the asynchronous runs report their virtual clock.
Each method runs until the same virtual time budget (the synchronous run's rounds set it).

    METAFED_DATA=../shared/data python benchmarks/async_clock.py [--sync-rounds 60] [--seeds 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metafed.asynchrony import client_step_times  # noqa: E402
from metafed.data.schedule import sample_clients  # noqa: E402
from sweep import run_grid  # noqa: E402

SPEED, SLOW, STEPS, N, M = "lognormal:1.0", 0.1, 20, 100, 10
ASYNC = dict(mode="async", client_speed=SPEED, slow_clients=SLOW)
METHODS = {
    "FedAvg (sync)": {},
    "FedBuff K=5, s = (1+tau)^-0.5": dict(**ASYNC, async_rule="fedbuff", buffer_size=5, staleness="poly:0.5"),
    "FedAsync a=0.6, s = (1+tau)^-0.5": dict(**ASYNC, async_rule="fedasync", staleness="poly:0.5"),
    "FedAsync a=0.6, unweighted": dict(**ASYNC, async_rule="fedasync", staleness="constant"),
}


def sync_clock(rounds: int, seed: int) -> list[float]:
    """Virtual time at the end of each synchronous round: its slowest client's job."""
    times, t = client_step_times(N, SPEED, SLOW, seed), 0.0
    out = []
    for r in range(1, rounds + 1):
        t += STEPS * max(times[c] for c in sample_clients(N, M, r, seed))
        out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sync-rounds", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--out", type=Path, default=Path("results/async"))
    ap.add_argument("--img", type=Path, default=Path("../docs/img"))
    a = ap.parse_args()
    base = dict(dataset="mnist", model="mlp", hidden=[100], num_clients=N, partition="dirichlet", dirichlet_alpha=0.3,
                standardize=True, clients_per_round=M, local_steps=STEPS, batch_size=10, lr=0.05, eval_clients=50,
                eval_train_loss=False, personalize_steps=0)
    budget = {s: sync_clock(a.sync_rounds, s)[-1] for s in range(a.seeds)}
    grid = {}
    for m, cfg in METHODS.items():
        for s in range(a.seeds):
            # enough server updates to outlast the sync run's virtual time: a synchronous round waits
            # for its slowest client, ~5x the mean job here, so ~50 jobs arrive per synchronous round
            per_sync_round = {"fedasync": 60, "fedbuff": 60 // cfg.get("buffer_size", 1)}.get(cfg.get("async_rule"), 1)
            rounds = a.sync_rounds * per_sync_round
            grid[f"{''.join(c for c in m if c.isalnum())}-s{s}"] = {**cfg, "seed": s, "rounds": rounds,
                                                                   "eval_every": max(1, rounds // 30)}
    results = run_grid(a.out, base, grid)
    print(f"\nMNIST Dirichlet(0.3), {N} clients, {M} at once, speeds {SPEED} with {SLOW:.0%} 10x slower; "
          f"virtual-time budget = {a.sync_rounds} synchronous rounds; mean ± std over {a.seeds} seeds\n")
    print(f"| method | accuracy at the budget | virtual time to {a.target:.0%} | server updates in the budget |")
    print("|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        accs, reach, updates = [], [], []
        for s in range(a.seeds):
            rows = results[f"{''.join(c for c in m if c.isalnum())}-s{s}"]
            clock = sync_clock(len(rows), s) if m.startswith("FedAvg") else [r["virtual_time"] for r in rows]
            evaluated = [(t, r["global_accuracy"]) for t, r in zip(clock, rows)
                         if "global_accuracy" in r and t <= budget[s] * 1.0001]
            accs.append(evaluated[-1][1])
            hit = [t for t, acc in evaluated if acc >= a.target]
            reach.append(hit[0] if hit else float("nan"))
            updates.append(sum(1 for t in clock if t <= budget[s] * 1.0001))
            if s == 0:
                ax.plot(*zip(*evaluated), marker=".", label=m)
        reached = [r for r in reach if r == r]
        when = f"{np.mean(reached):.0f}" + (f" ({len(reached)}/{a.seeds} seeds)" if len(reached) < a.seeds else "") \
            if reached else "not reached"
        print(f"| {m} | {np.mean(accs):.4f} ± {np.std(accs):.4f} | {when} | {np.mean(updates):.0f} |")
    ax.set(xlabel="virtual time (local-step units)", ylabel="global test accuracy",
           title="Accuracy vs simulated wall-clock (seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    a.img.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.img / "async_clock.png", dpi=90)


if __name__ == "__main__":
    main()
