"""How the flat :class:`~metafed.config.RunConfig` is grouped for people: each algorithm's own
hyperparameters under ``algorithm:``, every other key in a section.

The config model stays flat (one typed, validated field per key, so ``cfg.pfedme_lambda``
reads the same everywhere and the deployment ships one JSON object). What users write and
read is grouped::

    algorithm: {name: pfedme, lambda: 15, steps: 5, personal_lr: 0.01}
    rounds: 200

``config.yaml`` in a run folder and ``metafed config show`` use that form; flat keys
(``pfedme_lambda: 15``) are accepted too. A key that belongs to another algorithm than the
chosen one is refused by the config (it would be silently ignored).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metafed.config import RunConfig

# the client optimizer, where the algorithm leaves it free (metafed.algorithms.local_opt)
_LOCAL = {"local_optimizer": "local_optimizer", "local_momentum": "local_momentum"}
_MAML = {"inner_lr": "inner_lr", "inner_steps": "inner_steps"}
_PER_FEDAVG = {"alpha": "inner_lr"}

# algorithm -> {its name for the parameter inside ``algorithm:`` -> the config key}
ALGORITHM_PARAMS: dict[str, dict[str, str]] = {
    "fedavg": {**_LOCAL},
    "fedprox": {"mu": "mu", **_LOCAL},
    "reptile": {"anneal": "reptile_anneal", **_LOCAL},
    "maml": _MAML,
    "fomaml": _MAML,
    "meta-sgd": {"inner_lr": "inner_lr"},
    "per-fedavg-fo": _PER_FEDAVG,
    "per-fedavg-hf": _PER_FEDAVG,
    "personalized-fedavg": {"stage1_rounds": "stage1_rounds", "stage1_epochs": "stage1_epochs",
                            "stage2_server_optimizer": "stage2_server_optimizer",
                            "stage2_server_lr": "stage2_server_lr", **_LOCAL},
    "pfedme": {"lambda": "pfedme_lambda", "steps": "pfedme_steps", "personal_lr": "personal_lr"},
    "ditto": {"lambda": "ditto_lambda", "personal_lr": "personal_lr"},
    "fedmd": {"client_models": "client_models", "public_data": "public_data", "public_size": "public_size",
              "public_subset": "public_subset", "digest_epochs": "digest_epochs", "distill_lr": "distill_lr"},
    "feddf": {"client_models": "client_models", "public_data": "public_data", "public_size": "public_size",
              "distill_steps": "distill_steps", "distill_lr": "distill_lr", "distill_batch_size": "distill_batch_size",
              "temperature": "distill_temperature"},
    "fd": {"client_models": "client_models", "weight": "distill_weight", "temperature": "distill_temperature"},
    "meta-updater": {"alpha": "meta_alpha", "meta_lr": "meta_lr", "mix": "meta_mix", "val_period": "meta_val_period",
                     "order": "meta_order", "formulation": "meta_formulation"},
}

# config key -> the algorithms that read it (keys no algorithm owns are read by all)
KEY_OWNERS: dict[str, tuple[str, ...]] = {}
for _name, _params in ALGORITHM_PARAMS.items():
    for _key in _params.values():
        KEY_OWNERS[_key] = KEY_OWNERS.get(_key, ()) + (_name,)

# every key that no algorithm owns, in the order `config show` and `run --help` list them
SECTIONS: dict[str, tuple[str, ...]] = {
    "Data": ("dataset", "data_dir", "model", "hidden", "num_clients", "partition", "dirichlet_alpha",
             "shards_per_client", "test_fraction", "heldout_fraction", "max_clients", "synthetic_alpha",
             "synthetic_beta", "synthetic_iid", "size_multiplier", "standardize"),
    "Training": ("rounds", "clients_per_round", "local_epochs", "local_steps", "batch_size", "lr", "weighting",
                 "protocol", "client_sampling", "dropout", "stragglers", "straggler_policy", "min_clients"),
    "Server optimizer": ("server_optimizer", "server_lr", "server_momentum", "server_beta1", "server_beta2",
                         "server_tau"),
    "Communication": ("compress", "error_feedback", "compress_down"),
    "Asynchrony": ("mode", "async_rule", "async_alpha", "staleness", "buffer_size", "client_speed", "slow_clients"),
    "Aggregation and attacks": ("aggregator", "byzantine_f", "clip_tau", "fltrust_root_size", "attention_score",
                                "attention_temperature", "max_sample_weight", "sample_weight_cap", "attack",
                                "malicious_fraction", "attack_scale", "backdoor_target"),
    "Incentives": ("contribution", "contribution_utility", "validation_size", "shapley_permutations",
                   "reward_budget", "reward_memory", "reward_floor", "ledger_key", "free_riders", "free_ride"),
    "Privacy": ("dp", "dp_clip", "dp_noise_multiplier", "target_epsilon", "dp_delta", "dp_accountant",
                "dp_adaptive_clip", "dp_target_quantile", "dp_clip_lr", "dp_count_noise",
                "insecure_reproducible_privacy", "secure_aggregation", "secagg_threshold", "secagg_neighbours",
                "secagg_dropout", "secagg_range", "secagg_bits"),
    "Evaluation": ("eval_every", "eval_clients", "eval_train_loss", "personalize_steps", "personalize_lr",
                   "personal_eval", "eval_batch_size"),
    "Execution": ("backend", "device", "chunk_size", "client_memory_mb", "compile", "ray_address", "ray_workers",
                  "seed", "out", "checkpoint_every", "progress", "loggers"),
}
ALGORITHM_SECTION = "Algorithm"


def section_of(key: str) -> str:
    """The help panel / `config show` section a config key is listed in."""
    if key == "algorithm" or key in KEY_OWNERS:
        return ALGORITHM_SECTION
    return next(name for name, keys in SECTIONS.items() if key in keys)


def flatten_algorithm(values: dict) -> dict:
    """``algorithm: {name: pfedme, lambda: 15}`` -> ``algorithm: pfedme, pfedme_lambda: 15``;
    any other mapping is returned as it is. Raises ValueError naming the problem."""
    group = values.get("algorithm")
    if not isinstance(group, dict):
        return values
    group = {str(k).replace("-", "_"): v for k, v in group.items()}
    name = group.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("algorithm: a mapping needs `name:` (e.g. algorithm: {name: pfedme, lambda: 15})")
    if name not in ALGORITHM_PARAMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHM_PARAMS)}")
    params = ALGORITHM_PARAMS[name]
    accepted = {**{key: key for key in params.values()}, **params}
    flat = {k: v for k, v in values.items() if k != "algorithm"}
    for given, value in group.items():
        key = accepted.get(given)
        if key is None:
            raise ValueError(f"algorithm {name!r} has no parameter {given!r} (its parameters: "
                             f"{', '.join(params) or 'none'})")
        if key in flat and flat[key] != value:
            raise ValueError(f"{key} is given twice, as algorithm.{given}: {value!r} and {key}: {flat[key]!r}")
        flat[key] = value
    flat["algorithm"] = name
    return flat


def grouped_config(cfg: "RunConfig") -> dict[str, Any]:
    """The config as users write it: the algorithm's parameters under ``algorithm:`` and
    other algorithms' keys left out (they are at their defaults, or the config is invalid)."""
    flat = json.loads(cfg.model_dump_json())
    group = {"name": cfg.algorithm, **{short: flat[key] for short, key in ALGORITHM_PARAMS[cfg.algorithm].items()}}
    return {key: (group if key == "algorithm" else value) for key, value in flat.items()
            if key not in KEY_OWNERS}


def show_config(cfg: "RunConfig") -> str:
    """``metafed config show``: the resolved config as loadable YAML, by section, each key
    with its description and whether it is the default."""
    import yaml

    from metafed.version import __version__
    from metafed.algorithms import ALGORITHMS

    fields = type(cfg).model_fields
    values = json.loads(cfg.model_dump_json())

    def line(name: str, key: str, indent: str) -> str:
        text = yaml.safe_dump({name: values[key]}, default_flow_style=True, sort_keys=False, width=10**6)
        text = text.strip().removeprefix("{").removesuffix("}")
        default = fields[key].get_default(call_default_factory=True)
        state = "default" if values[key] == json.loads(json.dumps(default, default=str)) else "set"
        return f"{indent}{text}  # {fields[key].description} [{state}]"

    spec = ALGORITHMS[cfg.algorithm]
    out = [f"# metafed {__version__}: the resolved config of `{cfg.algorithm}` (load it with metafed run -c FILE)",
           f"# {cfg.algorithm}: {spec.summary}", f"# paper: {spec.paper}", "", f"# --- {ALGORITHM_SECTION}",
           "algorithm:", f"  name: {cfg.algorithm}"]
    out += [line(short, key, "  ") for short, key in ALGORITHM_PARAMS[cfg.algorithm].items()]
    for section, keys in SECTIONS.items():
        out += ["", f"# --- {section}"] + [line(key, key, "") for key in keys]
    return "\n".join(out) + "\n"
