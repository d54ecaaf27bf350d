"""Incentives: do contributions rank clients the way they should, and how good and cheap is
the Shapley estimator?

Part 1, ranking (`--part ranking`): MNIST (or the embedded digits with `--dataset digits`),
12 clients, IID, all training every round, MLP, FedAvg, `--contribution shapley` (GTG). Of
the 12: two free-riders (zero, noise or copy: one run each), two clients with 80 % of their
labels replaced by random ones ("noisy"), and two holding the same data ("dup-a" is a copy
of "dup-b"'s training set). Reported: each role's share of all rewards paid and the honest
clients' rank by accumulated contribution.

Part 2, estimator (`--part estimator`): 8 clients per round, MNIST Dirichlet(0.5), the
utilities of each round computed once (cached); exact Shapley (256 utilities) against
GTG-Shapley with its default stopping rule and against plain Monte Carlo permutations
without truncation (same number of permutations): relative L1 error per round and utilities
evaluated.

    METAFED_DATA=../shared/data python benchmarks/incentives.py --part ranking --rounds 20
    METAFED_DATA=../shared/data python benchmarks/incentives.py --part estimator --rounds 10
    METAFED_DATA=../shared/data python benchmarks/incentives.py --part cost --rounds 3
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from metafed.config import RunConfig
from metafed.data import load_dataset
from metafed.incentive.contribution import ContributionMeter
from metafed.incentive.shapley import CachedUtility, exact_shapley, gtg_shapley
from metafed.run import build_federation


def _ranking_data(cfg: RunConfig, roles: dict[int, str], seed: int):
    ds = load_dataset(cfg)
    clients = list(ds.clients)
    rng = np.random.default_rng([seed, 99])
    dup_b = next(c for c, r in roles.items() if r == "dup-b")
    for cid, role in roles.items():
        c = clients[cid]
        if role == "noisy":
            y = c.train_y.clone()
            flip = torch.from_numpy(rng.random(len(y)) < 0.8)
            y[flip] = torch.from_numpy(rng.integers(0, ds.num_classes, int(flip.sum())))
            clients[cid] = replace(c, train_y=y)
        elif role == "dup-a":
            clients[cid] = replace(c, train_x=clients[dup_b].train_x, train_y=clients[dup_b].train_y)
    return replace(ds, clients=clients)


def ranking(dataset: str, rounds: int, seed: int) -> None:
    from metafed.attacks import choose_free_riders

    n = 12
    for how in ("zero", "noise", "copy"):
        cfg = RunConfig(dataset=dataset, num_clients=n, clients_per_round=n, partition="iid", rounds=rounds,
                        local_epochs=1, batch_size=32, lr=0.05, contribution="shapley", free_riders=2 / n,
                        free_ride=how, seed=seed, progress=False, eval_every=rounds, hidden=[100])
        riders = choose_free_riders(n, 2 / n, seed)
        others = [c for c in range(n) if c not in riders]
        roles = {c: "free-rider" for c in riders}
        roles.update({others[0]: "noisy", others[1]: "noisy", others[2]: "dup-a", others[3]: "dup-b"})
        roles.update({c: "honest" for c in others[4:]})
        fed = build_federation(cfg, data=_ranking_data(cfg, roles, seed))
        reward, contribution = np.zeros(n), np.zeros(n)
        flagged = np.zeros(n, dtype=int)
        for rnd in range(1, rounds + 1):
            fed.run_round(rnd)
            s = fed.settlement
            for cid, r, p, f in zip(s.ids, s.rewards, s.contributions, s.flags):
                reward[cid] += r
                contribution[cid] += p
                flagged[cid] += bool(f)
        order = sorted(others, key=lambda c: -contribution[c])  # honest-by-intent clients, best first
        share = {role: round(float(sum(reward[c] for c, r in roles.items() if r == role) / reward.sum()), 4)
                 for role in ("honest", "dup-a", "dup-b", "noisy", "free-rider")}
        print(json.dumps({"free_ride": how, "rounds": rounds, "reward_share": share,
                          "rank_by_contribution": [f"{c}:{roles[c]}" for c in order],
                          "contribution": {f"{c}:{roles[c]}": round(float(contribution[c]), 4) for c in range(n)},
                          "rounds_flagged": {f"{c}:{roles[c]}": int(flagged[c]) for c in range(n) if flagged[c]}}),
              flush=True)


class _Both(ContributionMeter):
    """Settles with exact Shapley and records GTG and plain Monte Carlo on the same utilities."""

    rows: list = []

    def settle(self, state, sent, ids, weights, rnd, num_clients):
        from metafed.tree import flatten_messages
        from metafed import tree

        rows, layout = flatten_messages(sent)
        u = self.utility(state, rows, weights.to(torch.float64), layout, tree.nested_index(sent, 0), rnd)
        exact = exact_shapley(len(ids), u)

        def counted(utility):
            seen = set()

            def f(s):
                seen.add(s)
                return utility(s)
            return f, seen

        f, seen = counted(u)
        gtg = gtg_shapley(len(ids), f, np.random.default_rng([self.seed, 20, rnd]))
        g, seen_mc = counted(u)
        perms = max(50, 10 * len(ids))
        mc = gtg_shapley(len(ids), g, np.random.default_rng([self.seed, 30, rnd]), eps=-1.0, max_permutations=perms,
                         tolerance=-1.0)
        err = lambda est: float(np.abs(est - exact).sum() / max(np.abs(exact).sum(), 1e-12))  # noqa: E731
        self.rows.append({"round": rnd, "gtg_rel_l1": round(err(gtg), 4), "gtg_utilities": len(seen),
                          "mc_rel_l1": round(err(mc), 4), "mc_utilities": len(seen_mc), "exact_utilities": 2 ** len(ids),
                          "utility_range": round(float(exact.sum()), 4)})
        return super().settle(state, sent, ids, weights, rnd, num_clients)


def estimator(dataset: str, rounds: int, seed: int) -> None:
    import time

    cfg = RunConfig(dataset=dataset, num_clients=40, clients_per_round=8, partition="dirichlet", dirichlet_alpha=0.5,
                    rounds=rounds, local_epochs=1, batch_size=32, lr=0.05, contribution="shapley-exact", seed=seed,
                    progress=False, hidden=[100])
    fed = build_federation(cfg)
    fed.meter.__class__ = _Both
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        fed.run_round(rnd)
    for row in _Both.rows:
        print(json.dumps(row), flush=True)
    rows = _Both.rows
    print(json.dumps({"summary": True, "rounds": rounds, "gtg_rel_l1_mean": round(np.mean([r["gtg_rel_l1"] for r in rows]), 4),
                      "gtg_utilities_mean": round(np.mean([r["gtg_utilities"] for r in rows]), 1),
                      "mc_rel_l1_mean": round(np.mean([r["mc_rel_l1"] for r in rows]), 4),
                      "mc_utilities_mean": round(np.mean([r["mc_utilities"] for r in rows]), 1),
                      "exact_utilities": 256, "seconds": round(time.perf_counter() - t0, 1)}))


def cost(dataset: str, rounds: int, seed: int) -> None:
    """GTG-Shapley's cost as the cohort grows: utilities evaluated and seconds per round."""
    import time

    for n in (10, 20, 50):
        cfg = RunConfig(dataset=dataset, num_clients=n, clients_per_round=n, partition="dirichlet", dirichlet_alpha=0.5,
                        rounds=rounds, local_epochs=1, batch_size=32, lr=0.05, contribution="shapley", seed=seed,
                        progress=False, hidden=[100])
        fed = build_federation(cfg)
        evals, secs = [], []
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            fed.run_round(rnd)
            total = time.perf_counter() - t0
            evals.append(fed.settlement.evaluations)
            secs.append(total)
        print(json.dumps({"clients_per_round": n, "rounds": rounds, "utilities_per_round": evals,
                          "round_seconds_with_settlement": [round(t, 2) for t in secs]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("ranking", "estimator", "cost"), required=True)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    {"ranking": ranking, "estimator": estimator, "cost": cost}[a.part](a.dataset, a.rounds, a.seed)


if __name__ == "__main__":
    main()
