"""The ONE round loop: sample -> broadcast -> run clients -> validate -> aggregate ->
server update -> (evaluate). Tracking and checkpointing hang off it in ``run.py``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from metafed import tree
from metafed.algorithms.base import FederatedAlgorithm, ServerState
from metafed.attacks import DEFAULT_SCALE, backdoor_accuracy, corrupt_updates
from metafed.backends.base import Backend, ClientTask
from metafed.client_store import ClientStore
from metafed.config import RunConfig
from metafed.data.federated import FederatedDataset
from metafed.data.schedule import client_schedule, poisson_sample_clients, sample_clients, straggler_steps
from metafed.eval import Evaluator
from metafed.privacy.accountant import PrivacyAccountant, calibrate_noise
from metafed.privacy.dp import ClientDP

log = logging.getLogger("metafed")

HELDOUT_ADAPT_STEPS = (0, 1, 5, 10)


@dataclass
class Federation:
    cfg: RunConfig
    dataset: FederatedDataset
    algorithm: FederatedAlgorithm
    backend: Backend
    aggregator: object
    state: ServerState
    clients: ClientStore = field(default_factory=ClientStore)
    malicious: set[int] = field(default_factory=set)

    def __post_init__(self):
        if self.dataset.num_clients < 1:
            raise ValueError("the dataset has no training clients")
        self.evaluator = Evaluator(self.algorithm, self.backend, self.cfg.eval_batch_size,
                                   self.cfg.personalize_lr or self.cfg.lr, self.cfg.seed)
        self.dp, self.accountant = self._privacy()
        self._run_id = os.urandom(16)  # binds secure-aggregation sessions to this run
        self._cohort: list[int] = []

    def _privacy(self) -> tuple[ClientDP | None, PrivacyAccountant | None]:
        cfg = self.cfg
        if cfg.dp is None:
            return None, None
        n, m = self.dataset.num_clients, min(cfg.clients_per_round, self.dataset.num_clients)
        sampling = "local" if cfg.dp == "local" else cfg.client_sampling
        z = cfg.dp_noise_multiplier
        if z is None:
            z = calibrate_noise(cfg.target_epsilon, cfg.rounds, n, m, cfg.dp_delta, sampling, cfg.dp_accountant)
        dp = ClientDP(cfg.dp, z, float(m), cfg.dp_adaptive_clip, cfg.dp_target_quantile, cfg.dp_clip_lr,
                      cfg.dp_count_noise)
        dp.update_z  # noqa: B018 - validates the adaptive-clipping noise split before training starts
        return dp, PrivacyAccountant(z, n, m, cfg.dp_delta, sampling, cfg.dp_accountant)

    def _round_generator(self, rnd: int, stream: int) -> torch.Generator:
        seed = int(np.random.default_rng([self.cfg.seed, stream, rnd]).integers(2 ** 62))
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ one round
    def plan_round(self, rnd: int, batches_per_step: int, broadcast: dict) -> tuple[list[int], list[ClientTask], int]:
        """Which clients train this round and what each does: (client ids, tasks, #sampled)."""
        cfg = self.cfg
        sample = poisson_sample_clients if cfg.client_sampling == "poisson" else sample_clients
        sampled = sample(self.dataset.num_clients, cfg.clients_per_round, rnd, cfg.seed)
        n_gone = int(round(cfg.dropout * len(sampled)))
        gone = set(np.random.default_rng([cfg.seed, 8, rnd]).choice(sampled, n_gone, replace=False).tolist())
        rng = np.random.default_rng([cfg.seed, 4, rnd])
        n_slow = int(round(cfg.stragglers * len(sampled)))
        slow = set(rng.choice(sampled, n_slow, replace=False).tolist()) if n_slow else set()
        policy = cfg.straggler_policy or self.algorithm.straggler_policy
        epochs, steps = self.algorithm.local_work(rnd) or (cfg.local_epochs, cfg.local_steps)
        ids, tasks = [], []
        for cid in sampled.tolist():
            if cid in gone or (cid in slow and policy == "drop"):
                continue
            data = self.dataset.clients[cid]
            sched = client_schedule(data.num_train, batch_size=cfg.batch_size, epochs=epochs,
                                    steps=steps, batches_per_step=batches_per_step,
                                    rng=np.random.default_rng([cfg.seed, 3, rnd, cid]))
            active = len(sched)
            if cid in slow:
                active = straggler_steps(len(sched), epochs, steps is not None, rng)
            inputs = {"state": self.clients.get(cid, lambda: self.algorithm.client_init(broadcast)),
                      "num_samples": torch.tensor(float(data.num_train))}
            ids.append(cid)
            tasks.append(ClientTask(data.train_x, data.train_y, sched, active, inputs))
        self._cohort = sampled.tolist()
        return ids, tasks, len(sampled)

    def run_round(self, rnd: int) -> dict:
        """Train one round; returns the round's training metrics."""
        alg = self.algorithm
        broadcast = alg.broadcast(self.state, rnd)
        program = alg.client_program(rnd)
        ids, tasks, n_sampled = self.plan_round(rnd, program.batches_per_step, broadcast)
        metrics = {"round": rnd, "clients_sampled": n_sampled, "bytes_down": tree.nested_bytes(broadcast) * n_sampled,
                   **self.privacy_spent(rnd)}
        if not tasks:
            log.warning("round %d: no client returned an update (all dropped); the model is unchanged", rnd)
            return {**metrics, "clients_used": 0, "bytes_up": 0, "train_loss": float("nan")}
        outputs, losses = self.backend.run(program, broadcast, tasks)
        outputs = self._attack(outputs, ids, rnd)
        weights = torch.tensor([float(t.inputs["num_samples"]) for t in tasks])
        if self.cfg.max_sample_weight is not None:  # clients report their sample counts: cap them
            weights = weights.clamp(max=self.cfg.max_sample_weight)
        sent = {k: v for k, v in outputs.items() if k not in ("state", "metrics")}  # what clients upload
        ok = self._finite_rows(sent, ids)
        for i, cid in enumerate(ids if outputs["state"] else []):
            if ok[i]:
                self.clients.put(cid, tree.nested_index(outputs["state"], i))
        used = torch.nonzero(ok).flatten()
        metrics["clients_used"] = int(used.numel())
        if used.numel() == 0:
            return {**metrics, "bytes_up": 0, "train_loss": float("nan")}
        kept = tree.nested_index(sent, used)
        # clients' loss for loss-scored aggregators: a reported validation loss, else the training loss
        client_loss = outputs.get("metrics", {}).get("val_loss", losses)[used]
        if self.dp is not None:
            aggregate = self._private_aggregate(kept, weights[used], client_loss, rnd, metrics,
                                                [ids[i] for i in used.tolist()])
        elif self.cfg.secure_aggregation:
            aggregate = self._secure_mean(kept, weights[used], [ids[i] for i in used.tolist()], rnd, metrics)
        elif getattr(self.aggregator, "needs_reference", False):
            aggregate = self.aggregator(kept, weights[used], client_loss, reference=self._root_update(program, broadcast, rnd))
        else:
            aggregate = self.aggregator(kept, weights[used], client_loss)
        self.state = alg.server_update(self.state, aggregate, rnd)
        w = weights[used]
        metrics["bytes_up"] = tree.nested_bytes(kept)
        metrics["train_loss"] = float((losses[used].double() * w).sum() / w.sum())
        return metrics

    def _attack(self, outputs: dict, ids: list[int], rnd: int) -> dict:
        """Malicious clients replace what they send (update attacks; data attacks act earlier)."""
        if not self.cfg.attack or not self.malicious:
            return outputs
        bad = torch.tensor([cid in self.malicious for cid in ids])
        scale = self.cfg.attack_scale or DEFAULT_SCALE[self.cfg.attack]
        sent = {k: v for k, v in outputs.items() if k not in ("state", "metrics")}
        corrupted = corrupt_updates(self.cfg.attack, sent, bad, scale, self._round_generator(rnd, 10))
        return {**outputs, **corrupted}

    def _root_update(self, program, broadcast: dict, rnd: int) -> dict:
        """FLTrust: the server's own update on its small clean root dataset (drawn once from
        honest clients' training data)."""
        if not hasattr(self, "_root"):
            rng = np.random.default_rng([self.cfg.seed, 11])
            honest = [c for i, c in enumerate(self.dataset.clients) if i not in self.malicious]
            x = torch.cat([c.train_x for c in honest])
            y = torch.cat([c.train_y for c in honest])
            pick = torch.from_numpy(rng.choice(len(y), min(self.cfg.fltrust_root_size, len(y)), replace=False))
            self._root = (x[pick], y[pick])
        x, y = self._root
        epochs, steps = self.algorithm.local_work(rnd) or (self.cfg.local_epochs, self.cfg.local_steps)
        sched = client_schedule(len(y), batch_size=self.cfg.batch_size, epochs=epochs, steps=steps,
                                batches_per_step=program.batches_per_step,
                                rng=np.random.default_rng([self.cfg.seed, 12, rnd]))
        inputs = {"state": self.algorithm.client_init(broadcast), "num_samples": torch.tensor(float(len(y)))}
        out, _ = self.backend.run(program, broadcast, [ClientTask(x, y, sched, len(sched), inputs)])
        return {k: tree.nested_index(v, 0) for k, v in out.items() if k not in ("state", "metrics")}

    def _secure_sum(self, stacked: dict, client_ids: list[int], rnd: int, metrics: dict) -> dict:
        """Sum stacked messages [C, ...] through the secure-aggregation protocol (in memory).

        The round's cohort is every sampled client; the threshold t > n/2 of it is fixed
        before any reply arrives. Clients that did not reply never advertise keys,
        ``secagg_dropout`` of the repliers vanish after key sharing, and a client whose
        input lies outside the fixed-point range is dropped with a log line. Identity keys
        come from the trusted set-up (:meth:`_secagg_roster`). Returns the survivors' sum."""
        from metafed.aggregate.robust import flatten_messages, unflatten_message
        from metafed.privacy.secagg import FixedPoint, SecAggConfig, secure_sum
        from metafed.privacy.secagg.messages import session_id

        cfg = self.cfg
        x, layout = flatten_messages(stacked)  # [C, D] float64
        cohort = sorted(self._cohort)
        n_gone = int(round(cfg.secagg_dropout * len(client_ids)))
        gone = set(np.random.default_rng([cfg.seed, 13, rnd]).choice(client_ids, n_gone, replace=False).tolist())
        config = SecAggConfig(cfg.secagg_threshold or len(cohort) // 2 + 1, cfg.secagg_neighbours)
        signing, roster = self._secagg_roster(cohort)
        result = secure_sum({cid: x[i].numpy() for i, cid in enumerate(client_ids)}, config,
                            FixedPoint(cfg.secagg_range, cfg.secagg_bits), {"upload": gone}, cohort=cohort,
                            signing=signing, roster=roster, session=session_id(self._run_id, rnd))
        metrics["clients_used"] = len(result.survivors)
        dtype = tree.nested_leaves(stacked)[0].dtype
        return unflatten_message(torch.from_numpy(result.total), layout, dtype)

    def _secagg_roster(self, cohort: list[int]) -> tuple[dict, dict[int, bytes]]:
        """Trusted set-up of long-term Ed25519 identities (OS randomness, never stored)."""
        from metafed.privacy.secagg import identities

        if not hasattr(self, "_identities"):
            self._identities = {}
        missing = [c for c in cohort if c not in self._identities]
        if missing:
            signing, public = identities(missing)
            self._identities.update({c: (signing[c], public[c]) for c in missing})
        return {c: self._identities[c][0] for c in cohort}, {c: self._identities[c][1] for c in cohort}

    def _secure_mean(self, kept: dict, weights, client_ids: list[int], rnd: int, metrics: dict) -> dict:
        """Sample-weighted mean under secure aggregation: clients send n_i * message and n_i."""
        w = weights.double()
        scaled = tree.nested_map(lambda v: v.double() * w.view(-1, *([1] * (v.dim() - 1))), kept)
        total = self._secure_sum({"message": scaled, "weight": w}, client_ids, rnd, metrics)
        return tree.nested_map(lambda v: (v / total["weight"]).to(torch.float32), total["message"])

    def _private_aggregate(self, kept: dict, weights, client_loss, rnd: int, metrics: dict,
                           client_ids: list[int]) -> dict:
        """Clip (+ local noise) per client, then the DP mean (central) or the configured
        aggregator over the privatized messages (local). The clip norm lives in server state."""
        clip = float(self.state.extra.get("dp.clip", torch.tensor(self.cfg.dp_clip)))
        generator = self._round_generator(rnd, 7)
        if self.dp.mode == "central":
            summer = (lambda m: self._secure_sum(m, client_ids, rnd, metrics)) if self.cfg.secure_aggregation else None
            aggregate, next_clip, dp_metrics = self.dp.aggregate(kept, clip, generator, summer)
        else:
            private = self.dp.privatize(kept, clip, generator)
            if self.cfg.secure_aggregation:
                aggregate = self._secure_mean(private, weights, client_ids, rnd, metrics)
            else:
                aggregate = self.aggregator(private, weights, client_loss)
            next_clip, dp_metrics = clip, {"dp_clip": clip}
        self.state = replace(self.state, extra={**self.state.extra, "dp.clip": torch.tensor(next_clip, dtype=torch.float64)})
        metrics.update(dp_metrics)
        return aggregate

    def privacy_spent(self, rnd: int) -> dict:
        if self.accountant is None:
            return {}
        return {"epsilon": self.accountant.epsilon(rnd), "dp_delta": self.accountant.delta,
                "dp_noise_multiplier": self.accountant.noise_multiplier}

    @staticmethod
    def _finite_rows(update: dict, ids: list[int]) -> torch.Tensor:
        """Per client: are all update values finite? Non-finite updates are rejected and logged."""
        ok = torch.ones(len(ids), dtype=torch.bool)
        for v in tree.nested_leaves(update):
            ok &= torch.isfinite(v.reshape(len(ids), -1)).all(dim=1)
        for i in torch.nonzero(~ok).flatten().tolist():
            log.warning("rejected the update of client %d: it contains NaN or Inf", ids[i])
        return ok

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rnd: int) -> tuple[dict, dict]:
        broadcast = self.algorithm.broadcast(self.state, rnd)
        states = [self.clients.get(c, lambda: self.algorithm.client_init(broadcast))
                  for c in range(self.dataset.num_clients)]
        metrics, per_client = self.evaluator.evaluate(self.state, rnd, self.dataset.clients, states,
                                                      self.cfg.personalize_steps, self.dataset.heldout,
                                                      HELDOUT_ADAPT_STEPS)
        if self.cfg.attack == "backdoor":
            honest = [c for i, c in enumerate(self.dataset.clients) if i not in self.malicious]
            metrics["backdoor_accuracy"] = backdoor_accuracy(self.algorithm.model, self.algorithm.global_params(self.state),
                                                             honest, self.dataset.input_shape, self.cfg.backdoor_target)
        return metrics, per_client
