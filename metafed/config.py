"""The run configuration: one strict pydantic model. Unknown keys (typos) and bad values are
rejected with a message naming the field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metafed.config_layout import KEY_OWNERS, flatten_algorithm
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


class RunConfig(BaseModel):
    # allow_inf_nan=False: "inf" or "nan" is refused wherever a number is meant
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # what to train
    algorithm: str = Field("fedavg", description="the federated algorithm (list: `metafed algorithms`)")
    dataset: Literal["digits", "mnist", "femnist", "shakespeare", "synthetic", "w1"] = Field("digits",
        description="the federation to train on (list: `metafed datasets`)")
    data_dir: Optional[Path] = Field(None,
        description="folder holding mnist/, femnist/, shakespeare/ (default: $METAFED_DATA)")
    model: Optional[Literal["logistic", "mlp", "cnn", "small-cnn", "lstm"]] = Field(None,
        description="the network (default per dataset: mlp for digits and mnist, cnn for femnist, lstm for "
                    "shakespeare, logistic for synthetic)")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [200],
        description="hidden layer widths of mlp, e.g. 200 or 200,100")

    # how data is federated (digits / mnist are partitioned; LEAF is naturally federated)
    num_clients: int = Field(20, ge=1,
        description="clients to create (digits, mnist, synthetic; LEAF datasets bring their own users)")
    partition: Literal["iid", "dirichlet", "shards", "quantity"] = Field("dirichlet",
        description="how digits / mnist are split across clients")
    dirichlet_alpha: float = Field(0.5, gt=0,
        description="label skew of the dirichlet partition (smaller: more skewed)")
    shards_per_client: int = Field(2, ge=1, description="label shards per client in the shards partition")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="each client's held-out test share")
    heldout_fraction: float = Field(0.0, ge=0, lt=1,
        description="fraction of clients that never train (new-client evaluation)")
    max_clients: Optional[int] = Field(None, ge=1, description="use only the first N LEAF users")
    synthetic_alpha: float = Field(1.0, ge=0,
        description="Synthetic(alpha, beta): model heterogeneity across clients")
    synthetic_beta: float = Field(1.0, ge=0,
        description="Synthetic(alpha, beta): feature heterogeneity across clients")
    synthetic_iid: bool = Field(False, description="synthetic: one shared model and feature distribution")
    size_multiplier: int = Field(1, ge=1, description="synthetic: multiply every client size (pFedMe uses 5)")
    standardize: bool = Field(False, description="per-feature standardisation of digits / mnist / femnist inputs, "
                              "as the pFedMe and LEAF pipelines do (their learning rates assume it)")

    # rounds and local work
    rounds: int = Field(30, ge=1, description="communication rounds")
    clients_per_round: int = Field(10, ge=1,
        description="clients sampled each round (expected count under poisson sampling)")
    local_epochs: int = Field(2, ge=1, description="passes over the local data per round")
    local_steps: Optional[int] = Field(None, ge=1, description="overrides local_epochs when set")
    batch_size: int = Field(10, ge=1, description="local minibatch size")
    lr: float = Field(0.1, gt=0, description="client learning rate (beta of the meta-learning methods)")
    stragglers: float = Field(0.0, ge=0, le=1,
        description="fraction of sampled clients that do a random part of their local work")
    straggler_policy: Optional[Literal["drop", "keep"]] = Field(None,
        description="drop or keep stragglers' partial work (default: the algorithm's; keep for fedprox and "
                    "pfedme)")

    # algorithm hyperparameters
    local_optimizer: Literal["sgd", "momentum", "adam"] = Field(
        "sgd", description="client optimizer of fedavg, fedprox, reptile and personalized-fedavg (state fresh each "
        "round; the other algorithms keep their papers' SGD)")
    local_momentum: float = Field(0.9, ge=0, lt=1, description="momentum of --local-optimizer momentum")
    mu: float = Field(0.0, ge=0, description="FedProx proximal weight")
    server_optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = Field("sgd",
        description="the optimizer the server applies the aggregated update with (FedOpt)")
    server_lr: Optional[float] = Field(None, gt=0, description="server step (default per optimizer: sgd 1.0, "
                                       "adam 0.01, yogi 0.01, adagrad 0.1)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="momentum of the sgd server optimizer (FedAvgM)")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="adam / yogi first-moment decay")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="adam / yogi second-moment decay")
    server_tau: float = Field(1e-3, gt=0, description="adaptivity tau of adam / yogi / adagrad (Reddi et al. 2021)")

    # personalized / meta-learning hyperparameters
    inner_lr: float = Field(0.01, gt=0, description="alpha: MAML / Meta-SGD initial rate / Per-FedAvg")
    inner_steps: int = Field(1, ge=1, description="MAML inner SGD steps on the support batch")
    personal_lr: Optional[float] = Field(None, gt=0, description="pFedMe / Ditto personal rate (default lr)")
    pfedme_lambda: float = Field(15.0, gt=0,
        description="pFedMe: lambda, the pull of the personal model to the global one")
    pfedme_steps: int = Field(5, ge=1, description="K: inner steps of the Moreau-envelope solve")
    ditto_lambda: float = Field(0.1, ge=0,
        description="Ditto: lambda, the pull of the personal model to the global one")
    reptile_anneal: bool = Field(False, description="Reptile: anneal the server step eps linearly to 0 over the "
                                 "rounds (Nichol et al. 2018)")
    stage1_rounds: Optional[int] = Field(None, ge=0, description="Personalized FedAvg: FedAvg rounds (default rounds/2)")
    stage1_epochs: Optional[int] = Field(None, ge=1, description="Personalized FedAvg: local epochs in stage 1")
    stage2_server_optimizer: Optional[Literal["sgd", "adam", "yogi", "adagrad"]] = Field(
        None, description="Personalized FedAvg: the Reptile stage's server optimizer (default: --server-optimizer)")
    stage2_server_lr: Optional[float] = Field(None, gt=0, description="Personalized FedAvg: its learning rate "
                                              "(default: that optimizer's default)")
    meta_alpha: float = Field(1.0, gt=0, description="meta-updater: step size alpha in theta - alpha*u")
    meta_lr: Optional[float] = Field(None, gt=0, description="meta-updater: learning rate of u (default lr)")
    meta_mix: float = Field(0.5, ge=0, le=1, description="meta-updater: pull of theta_i, u_i towards w, u_g")
    meta_val_period: int = Field(5, ge=2, description="meta-updater: every n-th train sample is validation")
    meta_order: Literal["first", "second"] = Field("first",
        description="meta-updater: first- or second-order meta-gradient")
    meta_formulation: Literal["learned-step", "delta"] = Field(
        "learned-step", description="meta-updater: learned-step (u_i a learned step local training generalises "
        "from) or delta (the seed document as written: u_i from the model change, refined on the validation loss)")

    # federated distillation (metafed.distill): FedMD, FedDF, FD
    client_models: Optional[str] = Field(None,
        description="heterogeneous clients: reference models and their shares, e.g. mlp:0.5,small-cnn:0.5 "
                    "(default: every client runs --model)")
    public_data: Literal["pool", "mnist"] = Field("pool",
        description="unlabelled public inputs: pool (samples of this dataset no client holds: carved before "
                    "partitioning, or held-out clients' inputs) or mnist (MNIST images from DATA_DIR)")
    public_size: int = Field(1000, ge=10, description="public inputs the server and clients share")
    public_subset: int = Field(500, ge=1, description="FedMD: public inputs scored per round")
    digest_epochs: int = Field(1, ge=1, description="FedMD: passes over the subset towards the consensus")
    distill_lr: Optional[float] = Field(None, gt=0,
        description="FedDF: Adam rate of the server distillation (default 0.001); FedMD: SGD rate of the "
                    "digest (default --lr)")
    distill_steps: int = Field(100, ge=0, description="FedDF: server distillation batches per round")
    distill_batch_size: int = Field(128, ge=1, description="FedDF: public inputs per distillation batch")
    distill_temperature: float = Field(1.0, gt=0, description="FedDF, FD: softmax temperature of the teacher")
    distill_weight: float = Field(1.0, ge=0, description="FD: gamma, weight of the distillation term")

    # aggregation
    weighting: Literal["samples", "uniform"] = Field("samples", description="average client updates by their "
                                                     "sample counts (FedAvg) or uniformly (Per-FedAvg)")
    aggregator: Literal["mean", "attention", "median", "trimmed-mean", "krum", "multi-krum", "bulyan",
                        "centered-clipping", "fltrust"] = Field(
        "mean", description="how client updates are combined: mean, attention, or a robust rule")
    byzantine_f: Optional[int] = Field(None, ge=0, description="f for robust rules (default: expected attackers)")
    clip_tau: float = Field(0.1, gt=0, description="centered clipping radius")
    fltrust_root_size: int = Field(100, ge=1, description="FLTrust: server's clean root samples")
    max_sample_weight: Optional[float] = Field(None, gt=0, description="absolute cap on client-reported sample counts")
    sample_weight_cap: Optional[float] = Field(10.0, ge=1, description="cap each reported sample count at this "
                                               "multiple of the round's median count (None: no relative cap)")

    # communication
    compress: Optional[str] = Field(None, description="compress client uploads: identity, randk:F, topk:F "
                                    "(fraction F of coordinates), qsgd:S (S levels), q8, q4 (metafed.compression)")
    error_feedback: bool = Field(False, description="keep what compression did not send as client state and add it "
                                 "to the next upload (Karimireddy et al. 2019)")
    compress_down: Optional[str] = Field(None, description="compress the broadcast model: the server sends each "
                                         "round the encoded change of the clients' replica (same encoders as "
                                         "--compress; what is left out is sent later, metafed.compression.downlink)")

    # asynchrony (metafed.asynchrony)
    mode: Literal["sync", "async"] = Field("sync", description="sync rounds, or async: clients train on a virtual "
                                           "clock and the server applies updates as they arrive")
    async_rule: Literal["fedasync", "fedbuff"] = Field("fedbuff", description="async: FedAsync (mix in each arrival) "
                                                       "or FedBuff (apply the mean of every K arrivals)")
    async_alpha: float = Field(0.6, gt=0, le=1, description="FedAsync: mixing weight a of an arriving model")
    staleness: str = Field("poly:0.5", description="async: staleness weight s(tau): constant, poly:A ((1+tau)^-A), "
                           "hinge:A,B")
    buffer_size: Optional[int] = Field(None, ge=1, description="FedBuff: K arrivals per server update (default: "
                                       "clients-per-round)")
    client_speed: str = Field("lognormal:0.5", description="async: per-client time per local step: constant or "
                              "lognormal:SIGMA")
    slow_clients: float = Field(0.0, ge=0, le=1, description="async: fraction of clients 10x slower")

    # secure aggregation
    secure_aggregation: bool = Field(False,
        description="pairwise-masked secure aggregation: the server sees only the sum")
    secagg_threshold: Optional[int] = Field(None, ge=1, description="minimum survivors (default: majority)")
    secagg_neighbours: Optional[int] = Field(None, ge=2, description="SecAgg+ neighbourhood size k")
    secagg_dropout: float = Field(0.0, ge=0, lt=1, description="fraction dropping after key sharing")
    secagg_range: float = Field(1e4, gt=0, description="fixed-point range [-R, R] of n_i * update")
    secagg_bits: int = Field(40, ge=8, le=52, description="secure aggregation: fixed-point fraction bits")

    # attack simulation
    attack: Optional[Literal["label-flip", "sign-flip", "gaussian", "alie", "ipm", "backdoor"]] = Field(None,
        description="simulated malicious-client attack")
    malicious_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of clients that attack")
    attack_scale: Optional[float] = Field(None, gt=0, description="strength of the attack (default per attack)")
    backdoor_target: int = Field(0, ge=0, description="backdoor: the label triggered inputs are pushed to")

    # incentives: contributions, rewards, the ledger (metafed.incentive)
    contribution: Optional[Literal["size", "loo", "shapley", "shapley-exact"]] = Field(None,
        description="measure each client's contribution every round, pay rewards by it and keep a signed ledger "
                    "(RUN_DIR/ledger.jsonl): size (sample share), loo (leave-one-out), shapley (GTG-Shapley), "
                    "shapley-exact (<= 14 clients per round)")
    contribution_utility: Literal["accuracy", "loss"] = Field("accuracy",
        description="what a coalition's model is worth: its accuracy on the server's validation split, or minus "
                    "its mean loss there (smoother: fewer ties between coalitions)")
    validation_size: int = Field(500, ge=10, description="samples in the server's validation split that "
                                 "contributions are measured on")
    shapley_permutations: Optional[int] = Field(None, ge=1,
        description="GTG-Shapley: most permutations per round (default max(50, 10 x clients))")
    reward_budget: float = Field(100.0, ge=0, description="reward paid out each round, split by contribution")
    reward_memory: float = Field(0.8, ge=0, lt=1,
        description="rewards follow each client's reputation, a moving average of its contributions: r <- m r + "
                    "(1 - m) contribution per round taken part in (0: this round's contribution alone)")
    reward_floor: float = Field(0.0, ge=0, le=1,
        description="share of the budget split equally among the clients not flagged as free-riders")
    ledger_key: Optional[Path] = Field(None, description="the server's Ed25519 ledger key (PEM; created if absent) "
                                       "(default: RUN_DIR/ledger_key.pem)")
    free_riders: float = Field(0.0, ge=0, lt=1, description="simulated fraction of clients that free-ride")
    free_ride: Literal["zero", "noise", "replay", "copy"] = Field("zero",
        description="how simulated free-riders free-ride: send zeros, Gaussian noise of an honest update's norm, the "
                    "previous global update, or a copy of another client's update")
    attention_score: Literal["loss", "cosine", "labels"] = Field("loss",
        description="attention: loss (held-out validation loss), cosine (agreement with the mean), labels "
                    "(label-distribution similarity)")
    attention_temperature: float = Field(1.0, gt=0, description="attention: softmax temperature")

    # participation
    client_sampling: Literal["fixed", "poisson"] = Field("fixed",
        description="fixed: exactly clients-per-round; poisson: each client independently (for DP accounting)")
    dropout: float = Field(0.0, ge=0, lt=1, description="fraction of sampled clients that never reply")
    min_clients: int = Field(1, ge=1, description="a round commits only with at least this many valid replies; "
                                                  "otherwise it is skipped and the model is unchanged")

    # differential privacy
    dp: Optional[Literal["central", "local"]] = Field(None,
        description="client-level differential privacy: central (server adds noise) or local (each client)")
    dp_clip: float = Field(1.0, gt=0, description="DP: L2 clip norm of each client update")
    dp_noise_multiplier: Optional[float] = Field(None, ge=0, description="DP: noise std / clip norm")
    target_epsilon: Optional[float] = Field(None, gt=0, description="calibrate the noise multiplier to this")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="DP: delta of the (epsilon, delta) guarantee")
    dp_adaptive_clip: bool = Field(False,
        description="DP: adapt the clip norm to a quantile of update norms (Andrew et al. 2021)")
    dp_target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive clipping: target quantile of norms")
    dp_clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: learning rate of the clip norm")
    dp_count_noise: Optional[float] = Field(None, gt=0, description="sigma_b of adaptive clipping (default m/20)")
    dp_accountant: Literal["rdp", "pld"] = Field("rdp", description="DP accountant: rdp or pld (dp-accounting)")
    insecure_reproducible_privacy: bool = Field(False, description="TESTS ONLY: seeded DP noise and sampling; "
                                                "anyone with the seed can undo the noise, the guarantee does not hold")

    # evaluation
    protocol: Literal["equal-budget", "paper"] = Field(
        "equal-budget", description="equal-budget: every method adapts with --personalize-steps at evaluation; "
        "paper: each algorithm's own paper's training recipe and evaluation (see metafed.protocols)")
    eval_every: int = Field(1, ge=1, description="evaluate every N rounds (and at the last)")
    eval_clients: Optional[int] = Field(None, ge=1, description="score a fixed, seeded sample of this many "
                                        "training clients at each evaluation (default: all)")
    eval_train_loss: bool = Field(True, description="also report the global model's loss over all the evaluated "
                                  "clients' training data (a full pass)")
    personalize_steps: int = Field(5, ge=0,
        description="adaptation steps from the global model before scoring personalized accuracy")
    personal_eval: Literal["adapt", "stored"] = Field(
        "adapt", description="personalized accuracy: adapt (personalize-steps from the global model, or from the "
        "stored personal model) or stored (score each client's stored personal model as it is: pFedMe, Ditto)")
    personalize_lr: Optional[float] = Field(None, gt=0, description="learning rate of those steps (default: lr)")
    eval_batch_size: int = Field(10, ge=1, description="batch size of the adaptation steps")

    # execution
    backend: Literal["loop", "vectorized", "ray"] = Field("vectorized",
        description="loop (one client at a time), vectorized (torch.func over clients) or ray (parts of "
        "each cohort on Ray workers, each vectorized; extra metafed[ray])")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
        description="where clients' local work runs: cuda when visible (auto), cpu, or cuda (an error without a "
                    "GPU); seeded results agree across devices within float tolerance")
    chunk_size: int = Field(128, ge=1, description="vectorized and ray: clients per chunk")
    client_memory_mb: Optional[float] = Field(None, gt=0,
        description="memory for per-client states (personal models, residuals; MB); past it the least recently "
                    "used spill to RUN_DIR/clients/ (a temporary folder without --out) (default: no cap)")
    compile: bool = Field(False, description="vectorized and ray: torch.compile the step")
    ray_address: Optional[str] = Field(None, description="ray: join the cluster at this address (ray start "
                                       "--head prints it; default: start Ray on this machine)")
    ray_workers: Optional[int] = Field(None, ge=1, description="ray: parts each cohort is cut into, one Ray "
                                       "task each (default: the cluster's CPUs)")
    seed: int = Field(0, description="seed of everything reproducible (never of DP noise)")
    out: Optional[Path] = Field(None, description="run folder to write")
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers fed with each round's metrics, e.g. "
        "tensorboard,mlflow (extras of the same names; see metafed.loggers)")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N rounds (and at the last)")
    progress: bool = Field(True, description="progress bar on a terminal")

    @model_validator(mode="before")
    @classmethod
    def _apply_protocol(cls, values):
        """``algorithm: {name: X, ...}`` is flattened (:mod:`metafed.config_layout`); then
        ``protocol: paper`` fills every key the user did not set with the algorithm's paper
        recipe (:mod:`metafed.protocols`); config.yaml then records what actually ran."""
        if isinstance(values, dict):
            values = flatten_algorithm(values)
        if isinstance(values, dict) and values.get("protocol") == "paper":
            from metafed.protocols import paper_recipe

            values = {**paper_recipe(values), **values}
        return values

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        from metafed.algorithms import ALGORITHMS

        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
        return name

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
            given = [k for k in keys if getattr(self, k) != type(self).model_fields[k].default]
            if given:
                raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: settings of --mode async")
            return
        from metafed.asynchrony import parse_speed, staleness_weight

        staleness_weight(self.staleness)
        parse_speed(self.client_speed)
        if self.algorithm not in ("fedavg", "fedprox"):
            raise ValueError(f"--mode async runs FedAsync / FedBuff over local SGD: use --algorithm fedavg or fedprox, "
                             f"not {self.algorithm!r}")
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

        if self.algorithm not in DISTILLATION:
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
            raise ValueError(f"--algorithm {self.algorithm} (federated distillation) does not combine with "
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
        if self.algorithm == "fedprox" and self.mu == 0:
            raise ValueError("--algorithm fedprox needs --mu > 0 (the proximal weight; with mu = 0 it is FedAvg: "
                             "use --algorithm fedavg)")
        if self.algorithm == "pfedme" and (self.personal_lr or self.lr) * self.pfedme_lambda >= 2:
            raise ValueError(f"pFedMe's inner solve steps theta -= personal_lr * (grad f + lambda (theta - w)): "
                             f"personal_lr * lambda = {(self.personal_lr or self.lr) * self.pfedme_lambda:g} >= 2 "
                             "makes it diverge whatever the loss (lower --personal-lr or --pfedme-lambda)")
        if self.personal_eval == "stored" and self.algorithm not in STORED_PERSONAL_MODELS:
            raise ValueError(f"--personal-eval stored scores a personal model each client keeps: "
                             f"{self.algorithm!r} keeps none (use it with {', '.join(STORED_PERSONAL_MODELS)})")
        # another algorithm's setting would be silently ignored; compared with the defaults, not
        # model_fields_set, because a dumped config names every key
        foreign = [key for key, owners in KEY_OWNERS.items() if self.algorithm not in owners
                   and getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True)]
        if foreign:
            owners = sorted({name for key in foreign for name in KEY_OWNERS[key]})
            one = len(foreign) == 1
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} "
                             f"{'is a setting' if one else 'are settings'} of {', '.join(owners)}: algorithm "
                             f"{self.algorithm!r} ignores {'it' if one else 'them'} (remove "
                             f"{'it' if one else 'them'}, or choose one of those algorithms)")
        if self.local_momentum != 0.9 and self.local_optimizer != "momentum":
            raise ValueError("--local-momentum has no effect without --local-optimizer momentum")

    @property
    def needs_public_inputs(self) -> bool:
        """Whether the run's algorithm shares logits on public inputs (FedMD, FedDF): the dataset
        then carves them out of what the clients hold (:mod:`metafed.data.public`)."""
        from metafed.distill import NEEDS_PUBLIC

        return self.algorithm in NEEDS_PUBLIC

    def _refuse_ignored(self) -> None:
        on = {"aggregator": {"byzantine_f": self.aggregator in ("krum", "multi-krum", "trimmed-mean", "bulyan"),
                             "attention_score": self.aggregator == "attention",
                             "attention_temperature": self.aggregator == "attention",
                             "fltrust_root_size": self.aggregator == "fltrust",
                             "clip_tau": self.aggregator == "centered-clipping"},
              "backend": {"ray_address": self.backend == "ray", "ray_workers": self.backend == "ray"}}
        for key, (switch, flag) in NEEDS.items():
            if key not in self.model_fields_set or getattr(self, key) == type(self).model_fields[key].default:
                continue  # left at its default: nothing is being ignored
            active = on[switch][key] if switch in on else bool(getattr(self, switch))
            if not active:
                raise ValueError(f"--{key.replace('_', '-')} has no effect without {flag}: remove it or add {flag}")


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
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
            values.update(flatten_algorithm({str(k).replace("-", "_"): v for k, v in loaded.items()}))
        except ValueError as e:
            raise ConfigError(f"config file {file}: {e}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    except TypeError as e:  # e.g. a non-string key in the YAML mapping
        raise ConfigError(f"config is malformed: {e}") from None
