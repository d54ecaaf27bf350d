"""The ONE round loop: sample -> broadcast -> the client pool -> validate -> aggregate ->
server update -> (evaluate). Clients are reached only through a ``ClientPool``
(``metafed.pools``). Tracking and checkpointing hang off it in ``run.py``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, ServerState
from metafed.aggregate import RoundSkipped, cap_sample_weights
from metafed.asynchrony import AsyncDriver
from metafed.client.reply import upload_of
from metafed.tree import flatten_messages
from metafed.attacks import backdoor_accuracy, choose_free_riders
from metafed.backends.base import Backend, ClientTask
from metafed.client_store import ClientStore
from metafed.compression import make_compression
from metafed.compression.downlink import make_broadcast_compression
from metafed.data.federated import FederatedDataset
from metafed.data.schedule import poisson_sample_clients, program_schedule, sample_clients
from metafed.incentive.contribution import PREVIOUS_STEP, ContributionMeter, validation_split, weighted_mean
from metafed.pools import ClientPool, RoundReplies, SimulationPool
from metafed.pipeline import Flow, RoundContext, build_chain
from metafed.privacy.accountant import PrivacyAccountant, calibrate_noise
from metafed.privacy.dp import ClientDP
from metafed.privacy.noise import PrivacyRandom
from metafed.privacy.upload import UploadTransform
from metafed.simulate import SimulatedFaults
from metafed.privacy.secagg import SecAggAbort

if TYPE_CHECKING:
    from metafed.config import RunConfig

log = logging.getLogger("metafed")

# the privacy accountant's slot in ServerState.stages: the noise multiplier of every released round
LEDGER_SLOT = "privacy-ledger"



@dataclass
class Received:
    """The accepted replies of one round: client ids, their uploads stacked [C, ...] (None
    where the uploads stay on the clients until secure aggregation masks them), capped
    sample weights [C] and the losses loss-scored aggregators use [C]."""

    ids: list[int] = field(default_factory=list)
    kept: dict | None = None
    weights: torch.Tensor | None = None
    client_loss: torch.Tensor | None = None


@dataclass
class Federation:
    cfg: RunConfig
    dataset: FederatedDataset
    algorithm: FederatedAlgorithm
    backend: Backend
    aggregator: object
    state: ServerState
    malicious: set[int] = field(default_factory=set)
    pool: ClientPool | None = None  # default: the simulation pool over ``dataset``

    def __post_init__(self):
        if self.pool is None:
            self.pool = SimulationPool(self.cfg, self.dataset, self.algorithm, self.backend,
                                       compression=make_compression(self.cfg.compress, self.cfg.error_feedback))
        if self.pool.num_clients < 1:
            raise ValueError("the dataset has no training clients")
        self.dp, self.accountant = self._privacy()
        self.chain  # noqa: B018 - refuses a wrong stage order before training starts
        need = getattr(self.aggregator, "required_clients", lambda: 1)()
        if min(self.cfg.clients_per_round, self.pool.num_clients) < need:
            raise ValueError(f"--aggregator {self.cfg.aggregator} with f = {self.aggregator.f} needs at least {need} "
                             f"clients per round; raise --clients-per-round or lower --byzantine-f")
        self._run_id = os.urandom(16)  # binds secure-aggregation sessions to this run
        self._cohort: list[int] = []
        self.meter, self.settlement = self._contribution_meter(), None
        self.down = make_broadcast_compression(self.cfg.compress_down)
        self.free_riders = choose_free_riders(self.pool.num_clients, self.cfg.free_riders, self.cfg.seed)
        self.faults = SimulatedFaults(self.cfg.seed, self.cfg.attack, self.cfg.attack_scale, self.malicious,
                                      self.cfg.free_ride, self.free_riders)

    @property
    def chain(self):
        """The aggregation pipeline of this run, from its config, current DP (a resume may
        recalibrate the noise) and rule (:func:`metafed.pipeline.build_chain`)."""
        return build_chain(self.cfg, self.dp, self.aggregator, self.cfg.compress)

    def _contribution_meter(self) -> ContributionMeter | None:
        cfg = self.cfg
        if cfg.contribution is None:
            return None
        # "size" needs no validation data (in deployment the server holds none)
        validation = None if cfg.contribution == "size" else validation_split(self.dataset, cfg.validation_size,
                                                                               cfg.seed)
        return ContributionMeter(cfg.contribution, self.algorithm, validation, cfg.reward_budget, cfg.reward_floor,
                                 cfg.seed, cfg.shapley_permutations, value=cfg.contribution_utility,
                                 memory=cfg.reward_memory)

    def _privacy(self) -> tuple[ClientDP | None, PrivacyAccountant | None]:
        cfg = self.cfg
        if cfg.dp is None:
            return None, None
        n, m = self.pool.num_clients, min(cfg.clients_per_round, self.pool.num_clients)
        sampling = "local" if cfg.dp == "local" else cfg.client_sampling
        amplified = not cfg.insecure_reproducible_privacy  # a known cohort gets no sampling gain
        z = cfg.dp_noise_multiplier
        if z is None:
            z = calibrate_noise(cfg.target_epsilon, cfg.rounds, n, m, cfg.dp_delta, sampling, cfg.dp_accountant,
                                amplified=amplified)
        dp = ClientDP(cfg.dp, z, float(m), cfg.dp_adaptive_clip, cfg.dp_target_quantile, cfg.dp_clip_lr,
                      cfg.dp_count_noise)
        dp.update_z  # noqa: B018 - validates the adaptive-clipping noise split before training starts
        return dp, PrivacyAccountant(z, n, m, cfg.dp_delta, sampling, cfg.dp_accountant, amplified)

    def privacy_ledger(self) -> list[float]:
        """Noise multiplier of every round released so far (kept in server state, checkpointed)."""
        ledger = self.state.stages.get(LEDGER_SLOT, {}).get("ledger")
        return [] if ledger is None else [float(z) for z in ledger.reshape(-1)]

    def resume_privacy(self) -> None:
        """After a resume: keep the epsilon already spent (the ledger) and, for a target-epsilon
        run, recalibrate the noise of the remaining rounds so the total stays within target."""
        if self.dp is None or self.cfg.target_epsilon is None:
            return
        spent = self.privacy_ledger()
        remaining = self.cfg.rounds - len(spent)
        if remaining <= 0:
            return
        acc = self.accountant
        z = calibrate_noise(self.cfg.target_epsilon, remaining, acc.num_clients, acc.clients_per_round, acc.delta,
                            acc.sampling, acc.method, spent=spent, amplified=acc.amplified)
        if z > self.dp.noise_multiplier * 1.01:
            log.warning("resume: the rounds already released spent epsilon %.4g of --target-epsilon %g; the %d "
                        "remaining rounds run at noise multiplier %.4g (was %.4g) to stay within it",
                        self.accountant.epsilon_of(spent), self.cfg.target_epsilon, remaining, z,
                        self.dp.noise_multiplier)
        self.dp = replace(self.dp, noise_multiplier=z)
        self.dp.update_z  # noqa: B018
        self.accountant = replace(acc, noise_multiplier=z)

    def _charge_round(self, metrics: dict) -> None:
        """Append this round's release to the privacy ledger and report the composed epsilon."""
        ledger = self.privacy_ledger() + [self.dp.noise_multiplier]
        self.state = replace(self.state, stages={**self.state.stages,
                                                 LEDGER_SLOT: {"ledger": torch.tensor(ledger, dtype=torch.float64)}})
        metrics.update(epsilon=self.accountant.epsilon_of(ledger), dp_delta=self.accountant.delta,
                       dp_noise_multiplier=self.dp.noise_multiplier)

    def _privacy_random(self, rnd: int, *stream: int) -> PrivacyRandom:
        """Secure OS randomness, or the seeded stream behind insecure_reproducible_privacy."""
        if self.cfg.insecure_reproducible_privacy:
            return PrivacyRandom.insecure_reproducible(self.cfg.seed, rnd, *stream)
        return PrivacyRandom.secure_fresh()

    @property
    def clients(self) -> ClientStore:
        """Personal client states kept server-side (simulation); checkpointed with the run."""
        return self.pool.clients

    @clients.setter
    def clients(self, store: ClientStore) -> None:
        self.pool.clients = store

    # ------------------------------------------------------------------ one round
    def _sample(self, rnd: int) -> np.ndarray:
        """This round's cohort. Under DP the choice is the privacy mechanism's: secure,
        unsaved randomness (amplification by sampling needs an unpredictable cohort)."""
        cfg, n = self.cfg, self.pool.num_clients
        if cfg.dp is not None and not cfg.insecure_reproducible_privacy:
            rand = PrivacyRandom.secure_fresh()
            return rand.sample_poisson(n, cfg.clients_per_round) if cfg.client_sampling == "poisson" \
                else rand.sample_fixed(n, cfg.clients_per_round)
        sample = poisson_sample_clients if cfg.client_sampling == "poisson" else sample_clients
        return sample(n, cfg.clients_per_round, rnd, cfg.seed)

    def step(self, state: ServerState, rnd: int) -> tuple[ServerState, dict]:
        """The round driver protocol: the server state in, (the new state, the round's row)
        out (``run.py`` drives rounds through it; checkpoints store what it returns)."""
        self.state = state
        row = self.run_round(rnd)
        return self.state, row

    def run_round(self, rnd: int) -> dict:
        """Train one round: sample -> pool (clients run the program and their per-client
        upload stage) -> validate -> aggregation pipeline -> server update."""
        if self.cfg.mode == "async":  # one server update of FedAsync / FedBuff, over the pool's async clients
            if getattr(self, "_async", None) is None:  # a virtual clock in simulation, real arrivals in deployment
                self._async = AsyncDriver(self.cfg, self.algorithm, self.pool, self.aggregator,
                                          self.pool.async_clients())
            self.state, row = self._async.step(self.state, rnd)
            return row
        if self.algorithm.combines_groups:  # model groups whose uploads the algorithm combines (distillation)
            return self._group_round(rnd)
        alg = self.algorithm
        broadcast = alg.broadcast(self.state, rnd)
        program = alg.client_program(rnd)
        cohort = self._sample(rnd)
        self._cohort = cohort.tolist()
        bytes_down, downlink = tree.nested_bytes(broadcast) * len(cohort), {}
        if self.down is not None:  # clients train from the replica the compressed broadcasts rebuild
            self.state, broadcast, params_bytes, round_down = self.down.apply(
                self.state, broadcast, cohort, self.pool.num_clients, self.cfg.seed, rnd)
            bytes_down += params_bytes - tree.nested_bytes(broadcast["params"]) * len(cohort)
            downlink = {"downlink": round_down}  # deployment sends each client what it missed
        replies = self.pool.train(rnd, cohort, program, broadcast, self._local_dp_transform(), **downlink)
        replies = self.faults.apply(replies, rnd, self._previous_step())  # simulated clients' misbehaviour
        metrics = {"round": rnd, "clients_sampled": len(cohort), "bytes_down": bytes_down,
                   "clients_used": 0, "bytes_up": 0, "train_loss": float("nan")}
        received = Received()
        if replies.ids:
            received = self._validate(replies, rnd, metrics)
        try:
            aggregate = self._aggregate(received, program, broadcast, rnd, metrics)
        except (RoundSkipped, SecAggAbort) as e:
            log.warning("round %d skipped, the model is unchanged: %s", rnd, e)
            metrics["round_skipped"] = 1
            aggregate = None
        self.settlement = None
        if aggregate is not None:
            if self.meter is not None:  # measured against the state the round started from
                self.settlement = self.meter.settle(self.state, received.kept, received.ids, received.weights, rnd,
                                                    self.pool.num_clients)
                metrics.update(self.settlement.metrics())
            # the pipeline's slots are the driver's to keep: algorithms rebuild their own state
            self.state = replace(alg.server_update(self.state, aggregate, rnd), stages=self.state.stages)
            self._keep_incentive_history(received)
        if self.dp is not None:
            self._charge_round(metrics)  # a sampled cohort was charged whatever happened next
        return metrics

    def _group_round(self, rnd: int) -> dict:
        """A round over model groups (federated distillation, :mod:`metafed.distill`): the
        cohort is sampled as every algorithm samples it and split by group; each group's
        clients train their group's program from its broadcast (one pool call per group, so
        each group runs vectorized); each group's replies are validated like any others
        (finite check, states kept, capped weights), and the algorithm's server step combines
        what the groups sent: logits (FedMD, FD) or weights (FedDF). The weight-averaging
        chain does not apply (the config refuses DP, SecAgg, robust rules, compression)."""
        alg = self.algorithm
        cohort = self._sample(rnd)
        self._cohort = cohort.tolist()
        metrics = {"round": rnd, "clients_sampled": len(cohort), "bytes_down": 0, "bytes_up": 0, "clients_used": 0,
                   "train_loss": float("nan")}
        uploads, losses, weights = [], [], []
        for g in range(alg.num_groups):
            members = cohort[[alg.group_of(int(c)) == g for c in cohort]]
            broadcast = alg.broadcast_group(self.state, rnd, g)
            metrics["bytes_down"] += alg.wire_bytes(broadcast) * len(members)
            replies = self.pool.train(rnd, members, alg.program_group(rnd, g), broadcast) if len(members) else None
            group_metrics: dict = {}
            got = self._validate(replies, rnd, group_metrics) if replies is not None and replies.ids else Received()
            metrics["bytes_up"] += group_metrics.get("bytes_up", 0)
            if not got.ids:
                uploads.append(None)
                continue
            uploads.append((got.ids, got.kept, got.weights))
            losses.append(got.client_loss.double())
            weights.append(got.weights)
        if losses:
            loss, w = torch.cat(losses), torch.cat(weights)
            metrics.update(clients_used=len(loss), train_loss=float((loss * w).sum() / w.sum()))
            self.state = replace(alg.server_step(self.state, uploads, rnd), stages=self.state.stages)
        return metrics

    def _validate(self, replies: RoundReplies, rnd: int, metrics: dict) -> "Received":
        """[simulated attacks] -> finite check -> keep accepted states -> capped weights.
        Under secure aggregation in deployment the uploads stay on the clients until the
        protocol masks them (``replies.outputs`` has no upload): nothing to check here, the
        fixed-point range bounds what each can contribute."""
        ids, outputs, losses = replies.ids, replies.outputs, replies.losses
        sent = upload_of(outputs)  # what clients upload
        # what travelled, rejected replies included: the encoded sizes of compressed uploads
        encoded = outputs.get("metrics", {}).get("upload_bytes")
        metrics["bytes_up"] = int(encoded.sum()) if encoded is not None else tree.nested_bytes(sent) if sent else 0
        ok = self._finite_rows(sent, ids) if sent else torch.ones(len(ids), dtype=torch.bool)
        self.pool.keep_states(ids, outputs.get("state", {}), ok)
        used = torch.nonzero(ok).flatten()
        if not len(used):
            return Received()
        used_ids = [ids[i] for i in used.tolist()]
        if self.cfg.weighting == "uniform":
            weights = torch.ones(len(used_ids), dtype=torch.float64)
        else:
            weights = cap_sample_weights(replies.num_samples[used], self.cfg.sample_weight_cap,
                                         self.cfg.max_sample_weight)
        # clients' loss for loss-scored aggregators: a reported validation loss, else the training loss
        client_loss = outputs.get("metrics", {}).get("val_loss", losses)[used]
        self._warn_unstable_inner_solve(outputs.get("metrics", {}).get("inner_increase"), rnd)
        kept = (sent if len(used) == len(ids) else tree.nested_index(sent, used)) if sent else None
        metrics.update(clients_used=len(used_ids),
                       train_loss=float((losses[used].double() * weights).sum() / weights.sum()))
        return Received(used_ids, kept, weights, client_loss)

    def _warn_unstable_inner_solve(self, increased, rnd: int) -> None:
        """pFedMe reports whether its inner solve ever raised its own objective (a stable
        gradient descent never does); warned about once per run."""
        if increased is None or not bool((increased > 0).any()) or getattr(self, "_warned_inner", False):
            return
        self._warned_inner = True
        log.warning("round %d: pFedMe's inner solve raised its objective on %d of %d clients: personal_lr * "
                    "(L + lambda) exceeds 2 for their loss, the personal models oscillate (lower --personal-lr)",
                    rnd, int((increased > 0).sum()), len(increased))

    def _aggregate(self, got: "Received", program, broadcast: dict, rnd: int, metrics: dict) -> dict:
        """The aggregation pipeline (:mod:`metafed.pipeline`): the chain built from the config
        turns the accepted replies into the aggregate; its stages keep their state in their
        slots of the server state. Per-client stages (local DP, clipping and weighting under
        secure aggregation) run where the client runs."""
        flow = Flow(got.ids, got.kept, got.weights, got.client_loss)
        ctx = RoundContext(
            rnd, metrics,
            secure_sum=lambda transform, weighting: self.pool.secure_sum(
                rnd, self._run_id, sorted(self._cohort), got.ids, got.kept, transform, weighting),
            empty_message=lambda: self._empty_message(program, broadcast, rnd),
            root_update=lambda: self._root_update(program, broadcast, rnd),
            label_counts=self.pool.label_counts,
            privacy_random=lambda stream: self._privacy_random(rnd, stream))
        aggregate, slots = self.chain.run(flow, ctx, self.state.stages)
        self.state = replace(self.state, stages=slots)
        return aggregate

    def _empty_message(self, program, broadcast: dict, rnd: int) -> dict:
        """A zero-row message with the shapes clients upload, to release noise in a round
        without replies (the pool dry-runs the program; rare, so nothing is cached)."""
        return self.pool.message_template(rnd, program, broadcast)

    # ------------------------------------------------------------------ incentives
    def _previous_step(self) -> torch.Tensor | None:
        """[D] the last round's mean accepted upload (float64), kept in the server state."""
        step = self.state.extra.get(PREVIOUS_STEP)
        return None if step is None else step.double()

    def _keep_incentive_history(self, got: "Received") -> None:
        """What the next round's settlement (and a replaying free-rider) reads, in the server
        state so that checkpoints carry it."""
        if self.settlement is not None:
            history = self.settlement.extra
        elif self.free_riders:
            history = {PREVIOUS_STEP: weighted_mean(flatten_messages(got.kept)[0], got.weights).float()}
        else:
            return
        self.state = replace(self.state, extra={**self.state.extra, **history})

    def _root_update(self, program, broadcast: dict, rnd: int) -> dict:
        """FLTrust: the server's own update on its small root dataset. The root set is a
        server-held split (carved from the pool before partitioning, or from held-out
        clients): the server does not know which clients are honest, so it never draws from
        clients' data."""
        if self.dataset.server_root is None:
            raise ValueError("fltrust needs the dataset's server-held root set")
        x, y = self.dataset.server_root
        epochs, steps = self.algorithm.local_work(rnd) or (self.cfg.local_epochs, self.cfg.local_steps)
        sched = program_schedule(program, len(y), batch_size=self.cfg.batch_size, epochs=epochs, steps=steps,
                                 rng=np.random.default_rng([self.cfg.seed, 12, rnd]))
        inputs = {"state": self.algorithm.client_init(broadcast), "num_samples": torch.tensor(float(len(y)))}
        out, _ = self.backend.run(program, broadcast, [ClientTask(x, y, sched, len(sched), inputs)])
        return {k: tree.nested_index(v, 0) for k, v in upload_of(out).items()}

    def _local_dp_transform(self) -> UploadTransform | None:
        """Local DP: every client clips to C and adds N(0, (z C)^2) with its own randomness."""
        if self.dp is None or self.dp.mode != "local":
            return None
        return UploadTransform(clip=self.cfg.dp_clip, noise_std=self.dp.noise_multiplier * self.cfg.dp_clip)

    @staticmethod
    def _finite_rows(update: dict, ids: list[int]) -> torch.Tensor:
        """Per client: are all update values finite? Non-finite updates are rejected and logged."""
        ok = torch.ones(len(ids), dtype=torch.bool)
        for v in tree.nested_leaves(update):
            # one read pass, no [C, P] boolean temporary: NaN and +-Inf surface in the extremes
            low, high = torch.aminmax(v.reshape(len(ids), -1), dim=1)
            ok &= torch.isfinite(low) & torch.isfinite(high)
        for i in torch.nonzero(~ok).flatten().tolist():
            log.warning("rejected the update of client %d: it contains NaN or Inf", ids[i])
        return ok

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int) -> tuple[dict, dict]:
        metrics, per_client = self.pool.evaluate(rnd, self.state)  # clients score on their own data
        if self.cfg.attack == "backdoor":
            honest = [c for i, c in enumerate(self.dataset.clients) if i not in self.malicious]
            metrics["backdoor_accuracy"] = backdoor_accuracy(self.algorithm.model, self.algorithm.global_params(self.state),
                                                             honest, self.dataset.input_shape, self.cfg.backdoor_target)
        return metrics, per_client
