"""The run configuration: a tree of sections, each declared beside the component that reads
it (:mod:`metafed.config.tree`). Unknown keys (typos) and bad values are rejected with a
message naming the key; settings that cannot go together are refused here, with one line
that says why."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from metafed.config.aliases import ALGORITHM_KEYS, KEYS, default_of, flat_name_of, flat_of, tree_of
from metafed.config.tree import ALGORITHM_SECTIONS, SECTIONS, AlgorithmSection
from metafed.errors import ConfigError  # noqa: F401 (re-exported: metafed.config.ConfigError)


# settings that only mean something when another one is on: set alone, they would be ignored
NEEDS = {
    "dp_clip": ("dp", "--dp central|local"), "dp_noise_multiplier": ("dp", "--dp"),
    "target_epsilon": ("dp", "--dp"), "dp_delta": ("dp", "--dp"), "dp_accountant": ("dp", "--dp"),
    "dp_adaptive_clip": ("dp", "--dp central"), "dp_target_quantile": ("dp_adaptive_clip", "--dp-adaptive-clip"),
    "dp_clip_lr": ("dp_adaptive_clip", "--dp-adaptive-clip"),
    "dp_count_noise": ("dp_adaptive_clip", "--dp-adaptive-clip"),
    "insecure_reproducible_privacy": ("dp", "--dp"),
    "secagg_threshold": ("secure_aggregation", "--secure-aggregation"),
    "secagg_neighbours": ("secure_aggregation", "--secure-aggregation"),
    "secagg_dropout": ("secure_aggregation", "--secure-aggregation"),
    "secagg_range": ("secure_aggregation", "--secure-aggregation"),
    "secagg_bits": ("secure_aggregation", "--secure-aggregation"),
    "byzantine_f": ("aggregator", "a robust --aggregator"),
    "attention_score": ("aggregator", "--aggregator attention"),
    "attention_temperature": ("aggregator", "--aggregator attention"),
    "fltrust_root_size": ("aggregator", "--aggregator fltrust"),
    "clip_tau": ("aggregator", "--aggregator centered-clipping"),
    "ray_address": ("backend", "--backend ray"), "ray_workers": ("backend", "--backend ray"),
    **{key: ("contribution", "--contribution") for key in ("validation_size", "contribution_utility",
       "shapley_permutations", "reward_budget", "reward_floor", "reward_memory", "ledger_key")},
    "free_ride": ("free_riders", "--free-riders"),
}

# algorithms whose clients keep a personal model (client state "personal") that evaluation can score
STORED_PERSONAL_MODELS = ("pfedme", "ditto", "meta-updater")


def _sections_model() -> type[BaseModel]:
    """The root's fields, one per section of :data:`metafed.config.tree.SECTIONS` (the
    algorithm's second): a new section is one line there, nothing here."""
    sections = [(name, (cls, Field(default_factory=cls))) for name, cls in SECTIONS.items()]
    algorithm = ("algorithm", (AlgorithmSection, Field(default_factory=ALGORITHM_SECTIONS["fedavg"])))
    fields = dict(sections[:1] + [algorithm] + sections[1:])
    return create_model("Sections", __config__=ConfigDict(extra="forbid", validate_assignment=True,
                                                         allow_inf_nan=False), **fields)


class RunConfig(_sections_model()):
    """The whole run: ``data``, ``algorithm`` (a union on ``name``: each algorithm's own
    section, so another algorithm's key cannot be written), ``training``, ``aggregation``,
    ``privacy`` (``dp``, ``secagg``), ``compression``, ``schedule``, ``incentives``,
    ``evaluation``, ``execution`` and ``simulate`` (everything a deployment refuses).

    Flat keys keep working everywhere: ``RunConfig(dp_clip=0.5)``, ``cfg.dp_clip`` and YAML
    files of flat keys read and write the tree through :mod:`metafed.config.aliases`."""

    @model_validator(mode="before")
    @classmethod
    def _tree_from_what_was_given(cls, values):
        """Flat keys and sections -> the tree. ``protocol: paper`` first fills every key the
        user did not set with the algorithm's paper recipe (:mod:`metafed.protocols`), so
        config.yaml records what actually ran. A key of another algorithm than the chosen one
        is refused (it would be silently ignored), unless it holds that key's default (older
        config files name every key)."""
        if not isinstance(values, dict):
            return values
        flat, name = flat_of(values)
        named, name = name is not None, "fedavg" if name is None else name
        if not isinstance(name, str) or name not in ALGORITHM_SECTIONS:
            raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHM_SECTIONS)}")
        if flat.get("protocol") == "paper":
            from metafed.protocols import paper_recipe

            flat = {**paper_recipe({**flat, "algorithm": name}), **flat}
        foreign = [key for key in flat if key in ALGORITHM_KEYS and name not in ALGORITHM_KEYS[key]]
        ignored = [key for key in foreign if flat[key] != default_of(key)]
        if ignored:
            owners = sorted({owner for key in ignored for owner in ALGORITHM_KEYS[key]})
            one = len(ignored) == 1
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in ignored)} "
                             f"{'is a setting' if one else 'are settings'} of {', '.join(owners)}: algorithm "
                             f"{name!r} ignores {'it' if one else 'them'} (remove "
                             f"{'it' if one else 'them'}, or choose one of those algorithms)")
        return tree_of({k: v for k, v in flat.items() if k not in foreign}, name, named)

    def __getattr__(self, name: str) -> Any:
        """Flat reads: ``cfg.dp_clip`` is ``cfg.privacy.dp.clip``; an algorithm parameter the
        chosen algorithm does not have reads as its default."""
        key = KEYS.get(name)
        if key is None:
            return super().__getattr__(name)
        if not key.path:
            section = self.__dict__["algorithm"]
            field = ALGORITHM_KEYS[name].get(section.name)
            return getattr(section, field) if field is not None else default_of(name)
        node: Any = self
        for part in key.path:
            node = getattr(node, part)
        return node

    def given_keys(self) -> set[str]:
        """The flat keys set explicitly (by the user, a file or the paper recipe)."""
        given = set()
        for section in self.model_fields_set:
            given |= _given(getattr(self, section), section)
        return given

    def flat_values(self) -> dict:
        """Every flat key with its value, JSON-ready (the chosen algorithm's parameters only)."""
        tree = self.model_dump(mode="json", by_alias=True)
        flat, name = flat_of(tree)
        return {"algorithm": name, **flat}

    def updated(self, **changes) -> "RunConfig":
        """A copy with some flat keys changed, validated again."""
        return type(self)(**{**self.flat_values(), **changes})

    def _check_incentives(self) -> None:
        if self.contribution is None:
            return
        if self.secure_aggregation or self.dp is not None:
            raise ValueError("--contribution measures each client's own update: the server does not see them under "
                             "--secure-aggregation, and under --dp they are outside the guarantee (remove one)")
        if self.mode == "async":
            raise ValueError("--contribution settles synchronous rounds: not with --mode async")
        if self.contribution == "shapley-exact" and min(self.clients_per_round, self.num_clients) > 14:
            raise ValueError("--contribution shapley-exact needs 2^C utilities per round: at most 14 clients per "
                             "round (use --contribution shapley)")

    @model_validator(mode="after")
    def _check_consistency(self) -> "RunConfig":
        if self.model == "lstm" and self.dataset != "shakespeare":
            raise ValueError("model 'lstm' reads character sequences: use it with dataset 'shakespeare'")
        if (self.attack is None) != (self.malicious_fraction == 0):
            raise ValueError("--attack and --malicious-fraction > 0 go together")
        if self.secure_aggregation and self.aggregator != "mean":
            raise ValueError(f"secure aggregation reveals only a sum: aggregator {self.aggregator!r} is not linear "
                             "and cannot run after it (use --aggregator mean)")
        if self.dp is not None:
            if (self.dp_noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("--dp needs exactly one of --dp-noise-multiplier and --target-epsilon")
            if self.dp == "central" and self.aggregator != "mean":
                raise ValueError("central DP calibrates noise to a clipped mean: use --aggregator mean")
            if self.dp == "local" and self.dp_adaptive_clip:
                raise ValueError("--dp-adaptive-clip adapts a clip norm at the server from a noised count: it "
                                 "exists for --dp central only")
            if self.aggregator == "attention" and self.attention_score == "labels":
                raise ValueError("--attention-score labels shows the server each client's label counts: not "
                                 "under --dp (use --attention-score cosine)")
            if self.dp == "local" and self.aggregator == "attention" and self.attention_score == "loss":
                raise ValueError("under --dp local clients send no raw losses: use --attention-score cosine")
        self._refuse_ignored()
        self._check_incentives()
        self._check_compression()
        self._check_async()
        self._check_algorithm_settings()
        self._check_distillation()
        if self.aggregator in ("krum", "multi-krum", "trimmed-mean", "bulyan") and self.byzantine_f is None \
                and self.attack is None:
            raise ValueError(f"--aggregator {self.aggregator} needs --byzantine-f F, the number of malicious "
                             "clients per round it must tolerate (with f = 0 it is no defence)")
        if self.secure_aggregation:
            from metafed.privacy.secagg.protocol import MIN_COHORT

            cohort = self.clients_per_round if self.client_sampling == "poisson" else min(self.clients_per_round,
                                                                                          self.num_clients)
            if cohort < MIN_COHORT:
                raise ValueError(f"--secure-aggregation with {cohort} clients per round: the sum of fewer than "
                                 f"{MIN_COHORT} clients reveals them (a sum of one is the input itself); raise "
                                 "--clients-per-round")
        if self.secagg_neighbours is not None and self.secagg_neighbours % 2:
            raise ValueError(f"--secagg-neighbours {self.secagg_neighbours}: SecAgg+ needs an even k (k/2 "
                             "neighbours on each side of the ring)")
        if self.secagg_threshold is not None and self.client_sampling == "fixed" and \
                not self.clients_per_round / 2 < self.secagg_threshold <= self.clients_per_round:
            raise ValueError(f"--secagg-threshold {self.secagg_threshold} must satisfy m/2 < t <= m for "
                             f"--clients-per-round m = {self.clients_per_round}")
        if self.client_sampling == "fixed" and self.min_clients > min(self.clients_per_round, self.num_clients):
            raise ValueError(f"--min-clients {self.min_clients} exceeds the clients sampled per round "
                             f"({min(self.clients_per_round, self.num_clients)}): no round could commit")
        if self.standardize and self.dataset in ("shakespeare", "synthetic", "w1"):
            raise ValueError(f"--standardize rescales pixel features: dataset {self.dataset!r} has none "
                             "(synthetic and w1 are already standardised, shakespeare is text)")
        if self.dataset == "shakespeare" and self.model not in (None, "lstm"):
            raise ValueError("dataset 'shakespeare' is text: use model 'lstm'")
        return self


    def _check_async(self) -> None:
        keys = ("async_rule", "async_alpha", "staleness", "buffer_size", "client_speed", "slow_clients")
        if self.mode == "sync":
            given = [k for k in keys if getattr(self, k) != default_of(k)]
            if given:
                raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: settings of --mode async")
            return
        from metafed.asynchrony import parse_speed, staleness_weight

        staleness_weight(self.staleness)
        parse_speed(self.client_speed)
        if self.algorithm.name not in ("fedavg", "fedprox"):
            raise ValueError(f"--mode async runs FedAsync / FedBuff over local SGD: use --algorithm fedavg or fedprox, "
                             f"not {self.algorithm.name!r}")
        unsupported = {"--dp": self.dp is not None, "--secure-aggregation": self.secure_aggregation,
                       "--attack": self.attack is not None, "--dropout": self.dropout > 0,
                       "--stragglers": self.stragglers > 0, "--compress": self.compress is not None,
                       f"--aggregator {self.aggregator}": self.aggregator != "mean",
                       "--client-sampling poisson": self.client_sampling == "poisson"}
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"--mode async does not combine with {', '.join(bad)} yet (slow clients are simulated "
                             "by --client-speed and --slow-clients)")
        if self.async_rule == "fedasync":
            if self.server_optimizer != "sgd" or self.server_lr is not None or self.server_momentum:
                raise ValueError("FedAsync mixes models with --async-alpha: it has no server optimizer (remove "
                                 "--server-optimizer, --server-lr, --server-momentum)")
            if self.buffer_size is not None:
                raise ValueError("--buffer-size is FedBuff's: use --async-rule fedbuff")

    def _check_distillation(self) -> None:
        """The distillation algorithms exchange logits (FedMD, FD) or distil at the server
        (FedDF): the weight-averaging chain (secure aggregation, DP, robust rules, compression,
        contributions, attacks, asynchrony, server optimizers) does not apply to them."""
        from metafed.distill import DISTILLATION

        if self.algorithm.name not in DISTILLATION:
            return
        if self.client_models is not None:
            from metafed.distill.groups import parse_client_models

            parse_client_models(self.client_models)
        on = {"--secure-aggregation": self.secure_aggregation, "--dp": self.dp is not None,
              "--compress": self.compress is not None, "--compress-down": self.compress_down is not None,
              f"--aggregator {self.aggregator}": self.aggregator != "mean",
              "--attack": self.attack is not None, "--contribution": self.contribution is not None,
              "--free-riders": self.free_riders > 0, "--mode async": self.mode == "async",
              "--personal-eval stored": self.personal_eval == "stored",
              "--server-optimizer / --server-lr / --server-momentum": self.server_optimizer != "sgd"
              or self.server_lr is not None or self.server_momentum > 0}
        bad = [flag for flag, given in on.items() if given]
        if bad:
            raise ValueError(f"--algorithm {self.algorithm.name} (federated distillation) does not combine with "
                             f"{', '.join(bad)}: it exchanges logits or distils at the server, not an averaged "
                             "update")
        if self.public_data == "mnist" and self.dataset == "mnist":
            raise ValueError("--public-data mnist on dataset mnist would share the clients' own images: use "
                             "--public-data pool")

    def _check_compression(self) -> None:
        if self.compress_down is not None:
            from metafed.compression.encoders import parse_compressor

            try:
                parse_compressor(self.compress_down)
            except ValueError as e:
                raise ValueError(str(e).replace("--compress ", "--compress-down ", 1)) from None
            if self.mode == "async":
                raise ValueError("--compress-down keeps one replica per round: not with --mode async, whose clients "
                                 "start from different model versions")
        if self.compress is None:
            if self.error_feedback:
                raise ValueError("--error-feedback keeps what compression left out: it needs --compress")
            return
        from metafed.compression.encoders import parse_compressor

        parse_compressor(self.compress)
        if self.secure_aggregation:
            raise ValueError(f"--compress {self.compress} with --secure-aggregation: the secure sum runs on dense "
                             "fixed-point vectors (top-k keeps different coordinates per client, quantizers decode "
                             "non-linearly); compressed secure aggregation is not supported yet")
        if self.dp is not None:
            raise ValueError(f"--compress {self.compress} with --dp: the DP guarantee is calibrated to the dense "
                             "clipped update; compressed DP uploads are not supported yet")

    def _check_algorithm_settings(self) -> None:
        if self.meta_formulation == "delta" and self.meta_order == "second":
            raise ValueError("--meta-formulation delta has no inner step to differentiate through: "
                             "--set meta_order=second applies to learned-step only")
        if self.algorithm.name == "fedprox" and self.mu == 0:
            raise ValueError("--algorithm fedprox needs --mu > 0 (the proximal weight; with mu = 0 it is FedAvg: "
                             "use --algorithm fedavg)")
        if self.algorithm.name == "pfedme" and (self.personal_lr or self.lr) * self.pfedme_lambda >= 2:
            raise ValueError(f"pFedMe's inner solve steps theta -= personal_lr * (grad f + lambda (theta - w)): "
                             f"personal_lr * lambda = {(self.personal_lr or self.lr) * self.pfedme_lambda:g} >= 2 "
                             "makes it diverge whatever the loss (lower --personal-lr or --pfedme-lambda)")
        if self.personal_eval == "stored" and self.algorithm.name not in STORED_PERSONAL_MODELS:
            raise ValueError(f"--personal-eval stored scores a personal model each client keeps: "
                             f"{self.algorithm.name!r} keeps none (use it with {', '.join(STORED_PERSONAL_MODELS)})")
        if self.local_momentum != 0.9 and self.local_optimizer != "momentum":
            raise ValueError("--local-momentum has no effect without --local-optimizer momentum")

    @property
    def needs_groups(self) -> bool:
        """Whether the run's algorithm brings model groups (the distillation algorithms)."""
        from metafed.distill import DISTILLATION

        return self.algorithm.name in DISTILLATION

    @property
    def needs_public_inputs(self) -> bool:
        """Whether the run's algorithm shares logits on public inputs (FedMD, FedDF): the dataset
        then carves them out of what the clients hold (:mod:`metafed.data.public`)."""
        from metafed.distill import NEEDS_PUBLIC

        return self.algorithm.name in NEEDS_PUBLIC

    def _refuse_ignored(self) -> None:
        on = {"aggregator": {"byzantine_f": self.aggregator in ("krum", "multi-krum", "trimmed-mean", "bulyan"),
                             "attention_score": self.aggregator == "attention",
                             "attention_temperature": self.aggregator == "attention",
                             "fltrust_root_size": self.aggregator == "fltrust",
                             "clip_tau": self.aggregator == "centered-clipping"},
              "backend": {"ray_address": self.backend == "ray", "ray_workers": self.backend == "ray"}}
        given = self.given_keys()
        for key, (switch, flag) in NEEDS.items():
            if key not in given or getattr(self, key) == default_of(key):
                continue  # left at its default: nothing is being ignored
            active = on[switch][key] if switch in on else bool(getattr(self, switch))
            if not active:
                raise ValueError(f"--{key.replace('_', '-')} has no effect without {flag}: remove it or add {flag}")


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = flat_name_of(e["loc"]) if e["loc"] else ""
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown config key {where!r}")
        else:
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def build_config(file: Optional[Path] = None, **overrides) -> RunConfig:
    """YAML file (optional) with flag overrides on top; raises ConfigError with one line."""
    values: dict = {}
    if file is not None:
        if not file.exists():
            raise ConfigError(f"config file {file} does not exist")
        if not file.is_file():
            raise ConfigError(f"config file {file} is a folder, not a YAML file")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file} is not valid YAML: {str(e).splitlines()[0]}") from None
        except (UnicodeDecodeError, OSError, RecursionError) as e:
            raise ConfigError(f"config file {file} cannot be read as text: {type(e).__name__}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping of keys to values")
        try:
            flat, name = flat_of({str(k).replace("-", "_"): v for k, v in loaded.items()})
        except ValueError as e:
            raise ConfigError(f"config file {file}: {e}") from None
        except TypeError as e:  # e.g. a non-string key in the YAML mapping
            raise ConfigError(f"config is malformed: {e}") from None
        values.update(flat)
        if name is not None:
            values["algorithm"] = name
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    except TypeError as e:  # e.g. a non-string key in the YAML mapping
        raise ConfigError(f"config is malformed: {e}") from None


def _given(section: BaseModel, name: str) -> set[str]:
    """The flat keys set explicitly inside ``section`` (recursively)."""
    if name == "algorithm":
        return {"algorithm"} | {type(section).flat_key(f) for f in section.model_fields_set if f != "name"}
    given = set()
    for field in section.model_fields_set:
        value = getattr(section, field)
        if isinstance(value, BaseModel):
            given |= _given(value, field)
        else:
            given.add(type(section).flat_key(field))
    return given
