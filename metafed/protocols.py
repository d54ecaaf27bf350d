"""Evaluation protocols: each paper's own recipe, or one equal budget for every method.

``protocol: equal-budget`` (the default) is metafed's comparison mode: every method trains
with the configured local work and, at evaluation, adapts with the same number of steps
(``--personalize-steps``) on each client's train split with its own adaptation rule
(fine-tuning at alpha for the MAML family, the Moreau solve for pFedMe, the personal
objective from the stored model for Ditto, the learned rates for Meta-SGD). Rankings under
it compare methods at one adaptation budget.

``protocol: paper`` fills every setting the user did not give with the recipe of the
algorithm's paper (below); settings given explicitly always win, and ``config.yaml``
records what ran. A recipe only names what differs from metafed's defaults:

- FedMeta (MAML, FOMAML, Meta-SGD; Chen et al. 2018, arXiv:1802.07876, Algorithm 1): one
  episode per client per round (``local_steps: 1``) whose update is the meta-gradient
  itself (client step ``lr: 1.0``: the client sends -g); the server averages and applies
  its outer optimizer, Adam. Evaluation adapts with the steps training optimised for:
  ``inner_steps`` for MAML, 1 for Meta-SGD (its learned rates are for one step).
- Per-FedAvg (Fallah et al. 2020, arXiv:2002.07948, Algorithm 1 and Section 5): uniform
  averaging of the local models; evaluation is one step of SGD at alpha on the client's
  train data.
- Personalized FedAvg (Jiang et al. 2019, arXiv:1909.12488, Section 3): stage 1 FedAvg with
  server momentum 0.9, stage 2 Reptile with Adam at the server, stage 3 fine-tuning.
- pFedMe (Dinh et al. 2020, arXiv:2006.08848, Section 5 and its official code): the
  personalized accuracy is that of each client's personal model theta_i as local training
  left it (``personal_eval: stored``).
- Ditto (Li et al. 2021, arXiv:2012.04221, Section 5): the stored personal model v_i is
  scored as it is (``personal_eval: stored``).
- Reptile (Nichol et al. 2018, arXiv:1803.02999, Section 6): the outer step size is
  annealed linearly to 0 (``reptile_anneal: true``).
- FedAvg, FedProx, meta-updater: their defaults are their papers' protocol.
"""
from __future__ import annotations

_FEDMETA = {"local_steps": 1, "lr": 1.0, "server_optimizer": "adam"}


def _fedmeta_maml(values: dict) -> dict:
    return {**_FEDMETA, "personalize_steps": int(values.get("inner_steps", 1))}


PAPER_RECIPES = {
    "maml": _fedmeta_maml,
    "fomaml": _fedmeta_maml,
    "meta-sgd": lambda values: {**_FEDMETA, "personalize_steps": 1},
    "per-fedavg-fo": lambda values: {"weighting": "uniform", "personalize_steps": 1},
    "per-fedavg-hf": lambda values: {"weighting": "uniform", "personalize_steps": 1},
    "personalized-fedavg": lambda values: {"server_momentum": 0.9, "stage2_server_optimizer": "adam"},
    "pfedme": lambda values: {"personal_eval": "stored"},
    "ditto": lambda values: {"personal_eval": "stored"},
    "reptile": lambda values: {"reptile_anneal": True},
}


def paper_recipe(values: dict) -> dict:
    """The settings ``protocol: paper`` implies for the algorithm in ``values`` (a raw
    config mapping); {} for algorithms whose defaults are their paper's protocol."""
    recipe = PAPER_RECIPES.get(str(values.get("algorithm", "fedavg")))
    return recipe(values) if recipe else {}
