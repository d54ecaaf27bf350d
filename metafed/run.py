"""Build a federation from a RunConfig and drive it: rounds, evaluation, tracking,
checkpoints, run-folder outputs. ``metafed run`` is a thin wrapper around :func:`run`."""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as save_bytes

from metafed.aggregate import make_aggregator
from metafed.algorithms import make_algorithm
from metafed.attacks import choose_malicious, poison_dataset
from metafed.backends import make_backend
from metafed.backends.device import resolve_device
from metafed.checkpoint import CLIENTS_DIR, CheckpointError, load_checkpoint, save_checkpoint
from metafed.client_store import ClientStore
from metafed.config import ConfigError, RunConfig
from metafed.config.aliases import default_of
from metafed.config.show import tree_dump
from metafed.data import DEFAULT_MODEL, load_dataset
from metafed.data.federated import FederatedDataset
from metafed.federation import Federation
from metafed.loggers import Trackers, check_installed
from metafed.losses import SampleFn, check_sample_fns, cross_entropy, top1
from metafed.models import FunctionalModel, build_or_call
from metafed.pools import SimulationPool
from metafed.privacy.accountant import PrivacyAccountant
from metafed.tracking import RunTracker
from metafed.run_folder import RunFolderError, check_target, create, exclusive, write_text_atomic
from metafed.types import Params

log = logging.getLogger("metafed")
CONFIG_FILE = "config.yaml"
PRIVACY_NOTICE = "PRIVACY_NOT_GUARANTEED.txt"
# a resumed run must match the original in everything but these
# what the model's trajectory does not depend on (device: up to float summation order)
RESUMABLE_CHANGES = {"rounds", "out", "progress", "backend", "device", "chunk_size", "client_memory_mb", "compile",
                     "ray_address", "ray_workers", "loggers", "eval_every", "checkpoint_every"}
# what a DP run releases under its (epsilon, delta) guarantee: the model, and the privacy
# bookkeeping; every other metric is computed from clients' data without noise
DP_RELEASED = {"round", "epsilon", "dp_delta", "dp_noise_multiplier", "dp_clip", "dp_unclipped_fraction_noisy"}


@dataclass
class RunResult:
    params: Params
    rows: list[dict]
    run_dir: Path | None
    federation: Federation


def build_federation(cfg: RunConfig, pool=None, model=None, data: FederatedDataset | None = None,
                     loss: SampleFn | None = None, score: SampleFn | None = None) -> Federation:
    """The federation a config describes. Simulated clients by default; with ``pool``
    (deployment) the clients' data stays with them and only its shape, which the clients
    report, is known here. ``model``: a callable returning your own ``nn.Module`` (called
    after seeding torch with the run's seed), instead of the config's reference model.
    ``data``: your own :class:`FederatedDataset`, instead of the config's dataset.
    ``loss`` / ``score``: per-sample functions of (outputs, targets) (:mod:`metafed.losses`;
    default cross-entropy and top-1), e.g. ``mse`` and ``within(0.5)`` for regression."""
    if pool is not None and (loss is not None or score is not None):
        raise ValueError("a custom loss or score runs in simulation: deployment nodes hold class labels (int64) "
                         "and train with cross-entropy")
    if pool is None:
        dataset = data if data is not None else load_dataset(cfg)
        malicious = choose_malicious(dataset.num_clients, cfg.malicious_fraction, cfg.seed) if cfg.attack else set()
        dataset = poison_dataset(dataset, malicious, cfg.attack, cfg.backdoor_target) if cfg.attack else dataset
        device = cfg.device if cfg.backend == "ray" else resolve_device(cfg.device)  # ray: each worker resolves
        backend = make_backend(cfg.backend, cfg.chunk_size, cfg.compile, dataset, cfg.ray_address, cfg.ray_workers,
                               device=device)
        num_clients = dataset.num_clients
    else:
        check_deployable(cfg)
        dataset, malicious = FederatedDataset(cfg.dataset, [], pool.input_shape, pool.num_classes), set()
        backend, num_clients = make_backend("loop", cfg.chunk_size, False), pool.num_clients
    module = make_module(cfg, dataset.input_shape, dataset.num_classes, model)
    model = FunctionalModel(module, loss or cross_entropy, score or top1)
    if pool is None:
        _check_task(cfg, dataset, model, custom_score=score is not None)
    algorithm = make_algorithm(cfg, model, dataset, cfg.model or DEFAULT_MODEL[cfg.dataset],
                               **({} if pool is None else _deployed_groups(cfg, pool)))
    if pool is not None:
        pool.algorithm = algorithm  # the Flower pool dry-runs programs to know what clients upload
    expected_cohort = min(cfg.clients_per_round, num_clients)
    if cfg.clients_per_round > num_clients:
        log.warning("--clients-per-round %d is larger than the federation's %d training clients: every client "
                    "trains every round", cfg.clients_per_round, num_clients)
    f = cfg.byzantine_f if cfg.byzantine_f is not None else math.ceil(cfg.malicious_fraction * expected_cohort)
    if cfg.byzantine_f is None and cfg.aggregator in ("krum", "multi-krum", "trimmed-mean", "bulyan"):
        log.warning("--aggregator %s tolerates f = %d per round: the expected number of simulated attackers "
                    "(ceil(malicious_fraction x cohort)); set --byzantine-f to choose", cfg.aggregator, f)
    aggregator = make_aggregator(cfg.aggregator, cfg.attention_score, cfg.attention_temperature, f, cfg.clip_tau)
    return Federation(cfg, dataset, algorithm, backend, aggregator, algorithm.init(model.init_params()),
                      malicious=malicious, pool=pool)


def _check_task(cfg: RunConfig, dataset: FederatedDataset, model: FunctionalModel, custom_score: bool) -> None:
    """The loss and score fit the data: float targets (regression) need a score that says
    what is correct, label attacks need class labels, and both functions return one finite
    value per sample on a real batch."""
    first = dataset.clients[0]
    if first.train_y.is_floating_point():
        if not custom_score:
            raise ValueError("the targets are floats (regression?): pass score= to say what counts as correct, "
                             "e.g. metafed.losses.within(0.5), and loss=, e.g. metafed.losses.mse")
        if cfg.attack in ("label-flip", "backdoor"):
            raise ValueError(f"--attack {cfg.attack} rewrites class labels: these targets are floats")
    with torch.no_grad():
        x, y = first.train_x[:4], first.train_y[:4]
        check_sample_fns(model.sample_loss, model.sample_score, model.apply(model.init_params(), x), y)


def make_module(cfg: RunConfig, input_shape, num_classes: int, model=None):
    """The run's nn.Module: ``model()`` (yours) or the config's reference model, with
    deterministic initial weights for the run's seed."""
    from metafed.data import DEFAULT_MODEL

    return build_or_call(model, cfg.model or DEFAULT_MODEL[cfg.dataset], input_shape, num_classes, cfg.seed,
                         tuple(cfg.hidden))


def _deployed_groups(cfg: RunConfig, pool) -> dict:
    """What a deployed distillation server needs instead of the federation: the training
    clients the groups are drawn over, and the public inputs (public, not any client's data:
    carved from the pooled dataset or held-out clients as in simulation, or MNIST)."""
    from metafed.distill import DISTILLATION

    if cfg.algorithm.name not in DISTILLATION:
        return {}
    return {"num_clients": pool.num_clients,
            "public": load_dataset(cfg).public if cfg.needs_public_inputs else None}


def check_deployable(cfg: RunConfig) -> None:
    """Refuse what the deployment cannot do honestly yet, rather than run it at the server."""
    if cfg.secagg_dropout:
        raise ConfigError("--secagg-dropout is simulated: in deployment dropouts are real, remove it")
    if cfg.attack or cfg.dropout or cfg.stragglers:
        raise ConfigError("attacks, dropout and stragglers are simulated: in deployment they are real, remove them")
    speed_default = default_of("client_speed")
    if cfg.mode == "async" and (cfg.client_speed != speed_default or cfg.slow_clients):
        raise ConfigError("--client-speed and --slow-clients simulate slow clients: in deployment speeds are real, "
                          "remove them")
    if cfg.free_riders:
        raise ConfigError("--free-riders is simulated: in deployment free-riders are real, remove it")
    if cfg.contribution not in (None, "size"):
        raise ConfigError(f"--contribution {cfg.contribution} needs a validation split held by the server, and in "
                          "deployment the server holds no data: use --contribution size there")
    if cfg.aggregator == "fltrust":
        raise ConfigError("fltrust needs a root dataset held by the server; in deployment the server holds no "
                          "data: choose another robust aggregator")
    # what is left of the simulate section: a deployment runs only with it empty
    simulated = [k for k in type(cfg.simulate).model_fields if getattr(cfg.simulate, k) != default_of(k)]
    if simulated:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in simulated)}: simulated behaviour (the "
                          "simulate section); in deployment it is real, remove it")


def config_dump(cfg: RunConfig) -> dict:
    """Every flat key with its JSON value (what trackers log and a resume compares)."""
    return cfg.flat_values()


class _PlainProgress:
    """Per-round lines for logs and CI (stdout is not a terminal), the bar's interface."""

    task_id = 0

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, task_id, completed: int, description: str) -> None:
        print(f"round {completed}/{self.total}  {description}", flush=True)


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return nullcontext(None)
    if not sys.stdout.isatty():
        return _PlainProgress(total)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), transient=False)
    bar.task_id = bar.add_task("", total=total, completed=done)
    return bar


def compile_would_pay(cfg: RunConfig, program=None) -> bool:
    """Measured on W1 (docs/benchmarks.md): compiling costs ~20 s and saved ~0.7 s per round
    at 1000 clients per round over the generic vmapped step; compile stays opt-in (it needs
    a C++ toolchain), so large, long vectorized runs get a hint instead. Plain-SGD programs
    (FedAvg, FedProx, Ditto) on an MLP or logistic model run the native kernel or the
    hand-fused step (metafed.backends.native, .fused_mlp), both faster than compiling: no
    hint there."""
    from metafed.backends.fused_mlp import sgd_mlp_plan

    large = cfg.backend == "vectorized" and not cfg.compile and cfg.clients_per_round >= 500 and cfg.rounds >= 50
    return large and (program is None or sgd_mlp_plan(program) is None)


def describe_federation(fed: Federation) -> str:
    """One line on the data and model a simulation trains: what a user checks first."""
    params = sum(v.numel() for v in fed.state.params.values())
    return f"{fed.dataset.describe()}; {fed.algorithm.name} on a {params:,}-parameter model"


def _describe(row: dict) -> str:
    keys = (("train_loss", "loss"), ("global_accuracy", "acc"), ("personalized_accuracy", "pers"))
    return "  ".join(f"{short} {row[k]:.3f}" for k, short in keys if k in row and row[k] == row[k])


def run(cfg: RunConfig, resume: Path | None = None, overwrite: bool = False, pool=None, model=None,
        data: FederatedDataset | None = None, loss: SampleFn | None = None, score: SampleFn | None = None
        ) -> RunResult:
    """Run (or resume) a federated job. With ``cfg.out`` set, writes the run folder.

    A fresh run refuses an ``out`` folder that already holds files unless ``overwrite``;
    nothing on disk changes until the whole job (config, data, model) has been validated.
    The run folder is held by this process for the whole run (see ``run_folder.exclusive``).
    ``model``, ``data``, ``loss`` and ``score``: your own (see :func:`build_federation`);
    give the same again to resume."""
    with ExitStack() as held:
        return _run(cfg, resume, overwrite, pool, (model, data, loss, score), held)


def _run(cfg: RunConfig, resume, overwrite: bool, pool, own: tuple, held: ExitStack) -> RunResult:
    run_dir = Path(resume) if resume else (Path(cfg.out) if cfg.out else None)
    check_installed(cfg.loggers)
    if cfg.dp is not None:
        PrivacyAccountant.require()
    if resume is not None:
        if run_dir.is_dir() and not run_dir.is_symlink():
            held.enter_context(exclusive(run_dir))
        fed, start = _restore(cfg, run_dir, pool, own)
    else:
        if run_dir:
            check_target(run_dir, overwrite)
        fed, start = build_federation(cfg, pool, *own), 0
        if run_dir:
            create(run_dir, overwrite)
            held.enter_context(exclusive(run_dir))
        if isinstance(fed.pool, SimulationPool):
            fed.clients = _client_store(fed.cfg, run_dir)
    cfg = fed.cfg
    ledger = _open_ledger(cfg, run_dir, resume is not None) if fed.meter is not None and run_dir else None
    if run_dir:  # on resume too: rounds (or another resumable setting) may have changed
        write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(tree_dump(cfg), sort_keys=False))
    if cfg.progress and isinstance(fed.pool, SimulationPool):
        print(describe_federation(fed), flush=True)
        if compile_would_pay(cfg, fed.algorithm.client_program(1)):
            print("hint: --compile would likely pay here (W1: ~20 s of compiling, then about 2x faster rounds at "
                  "1000 clients per round; docs/benchmarks.md)", flush=True)
    tracker = RunTracker(run_dir)
    if resume is not None:
        tracker.resume_from(start)
    else:
        tracker.start()
    trackers = Trackers(cfg.loggers, run_dir, config_dump(cfg), DP_RELEASED if fed.dp is not None else None)
    held.callback(trackers.close)
    _privacy_notice(cfg, run_dir)
    elapsed = tracker.rows[-1].get("wall_time_s", 0.0) if tracker.rows else 0.0
    per_client: dict = {}
    bytes_up = tracker.rows[-1].get("bytes_up_total", 0) if tracker.rows else 0
    bytes_down = tracker.rows[-1].get("bytes_down_total", 0) if tracker.rows else 0
    with _progress(cfg.progress, cfg.rounds, start) as bar:
        for rnd in range(start + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            fed.state, row = fed.step(fed.state, rnd)
            log.info("round %d trained in %.3f s (%d clients)", rnd, time.perf_counter() - t0, row["clients_used"])
            bytes_up += row["bytes_up"]
            bytes_down += row["bytes_down"]
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                t1 = time.perf_counter()
                metrics, per_client = fed.evaluate(rnd)
                log.info("round %d evaluated in %.3f s", rnd, time.perf_counter() - t1)
                row.update(metrics)
                tracker.log_clients(rnd, per_client)
            if ledger is not None and fed.settlement is not None:
                receipts = ledger.append(rnd, fed.settlement.records())
                fed.pool.deliver_receipts(rnd, receipts, ledger.public_key)  # deployment: to each client's node
            elapsed += time.perf_counter() - t0
            row.update(wall_time_s=round(elapsed, 4), bytes_up_total=bytes_up, bytes_down_total=bytes_down)
            if fed.dp is not None:
                row["outside_dp_guarantee"] = sorted(k for k in row if k not in DP_RELEASED)
            # one row per round: training loss, bytes and (under DP) epsilon every round, the
            # evaluation's metrics every --eval-every rounds
            tracker.log(row)
            trackers.log(row)
            if run_dir and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
                meta = {"wall_time_s": elapsed}
                if ledger is not None:
                    meta.update(ledger_entries=ledger.count, ledger_head=ledger.head)
                save_checkpoint(run_dir, rnd, fed.state, fed.clients, meta)
            if bar is not None:
                bar.update(bar.task_id, completed=rnd, description=_describe(row))
    params = fed.algorithm.global_params(fed.state)
    if run_dir:
        _write_outputs(run_dir, tracker, params, per_client, cfg, _label_counts(fed),
                       None if ledger is None else ledger.summary())
    return RunResult(params, tracker.rows, run_dir, fed)


def provenance() -> dict:
    """What produced a run folder: metafed's version, the git commit of its source when it
    is a checkout, and the command line."""
    import subprocess

    from metafed.version import __version__

    sha = None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=5)
        sha = done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"metafed": __version__, "git_sha": sha, "command": " ".join(sys.argv)}


def _privacy_notice(cfg: RunConfig, run_dir: Path | None) -> None:
    if cfg.dp is None or not cfg.insecure_reproducible_privacy:
        return
    text = ("insecure_reproducible_privacy is on: the DP noise and the client sampling follow from the seed in "
            "config.yaml, so anyone holding this folder can rebuild and subtract the noise. The epsilon reported "
            "here is NOT a privacy guarantee (and is charged without amplification by sampling).\n")
    log.warning(text.strip())
    if run_dir:
        write_text_atomic(run_dir / PRIVACY_NOTICE, text)


def privacy_summary(cfg: RunConfig, final: dict) -> dict | None:
    if cfg.dp is None:
        return None
    if cfg.insecure_reproducible_privacy:
        guarantee = "NONE: insecure_reproducible_privacy made the noise and sampling reproducible from the seed"
    else:
        guarantee = (f"client-level ({final.get('epsilon', float('nan')):.4g}, {cfg.dp_delta:g})-DP "
                     f"({cfg.dp} DP, {cfg.dp_accountant} accountant) for the released model")
    return {"guarantee": guarantee, "released_under_dp": sorted(DP_RELEASED) + ["final.safetensors (the model)"],
            "outside_dp_guarantee": final.get("outside_dp_guarantee", []) + ["per_client_accuracy"]}


def _restore(cfg: RunConfig, run_dir: Path, pool=None, own: tuple = ()) -> tuple[Federation, int]:
    """Rebuild the federation a run folder describes and load its last committed round.
    Settings that cannot change on resume are compared, and any difference is refused."""
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}: is it a metafed run folder?")
    try:
        loaded = yaml.safe_load(config_path.read_text())
        saved = RunConfig(**loaded)
    except (yaml.YAMLError, TypeError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not a valid metafed config: {str(e).splitlines()[0]}") from None
    asked = config_dump(cfg)
    merged = config_dump(saved)
    given = cfg.given_keys()
    changed = sorted(k for k in given - RESUMABLE_CHANGES if asked.get(k) != merged.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {merged.get(k)!r} -> {asked[k]!r}" for k in changed)
        raise CheckpointError(f"--resume cannot change settings of the run in {run_dir}: {diffs} "
                              f"(only {', '.join(sorted(RESUMABLE_CHANGES - {'out'}))} may change)")
    for key in RESUMABLE_CHANGES:
        if key in given:
            merged[key] = asked[key]
    merged["out"] = str(run_dir)
    resumed_cfg = RunConfig(**merged)
    ckpt = load_checkpoint(run_dir)
    if resumed_cfg.rounds < ckpt.round:
        raise CheckpointError(f"--rounds {resumed_cfg.rounds} is below the {ckpt.round} rounds {run_dir} has already "
                              "done: a resume can only continue")
    fed = build_federation(resumed_cfg, pool, *own)
    try:
        fed.algorithm.check_params(ckpt.state.params)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not fit this run's model: {e}") from None
    order = list(fed.state.params)  # the model's parameter order (safetensors returns keys sorted)
    fed.state = replace(ckpt.state, params={k: ckpt.state.params[k] for k in order})
    fed.clients = ckpt.clients
    if ckpt.clients.folder is None and isinstance(fed.pool, SimulationPool):  # an older checkpoint's states
        fed.clients = ckpt.clients.moved_to(run_dir / CLIENTS_DIR, _cap_bytes(resumed_cfg))
    fed.clients.memory_cap = _cap_bytes(resumed_cfg) if fed.clients.folder is not None else None
    fed.resume_privacy()
    return fed, ckpt.round


LABEL_CLIENTS = 200  # label histograms kept in summary.json and plotted: the first clients by id


def _open_ledger(cfg: RunConfig, run_dir: Path, resumed: bool):
    """The run's ledger (metafed.incentive.ledger); on resume it continues after the entries
    the last checkpoint committed (later ones belong to a round that did not commit)."""
    from metafed.checkpoint import read_pointer
    from metafed.incentive.ledger import KEY_FILE, Ledger, LedgerError, load_or_create_key

    try:
        ledger = Ledger(run_dir, load_or_create_key(Path(cfg.ledger_key) if cfg.ledger_key else run_dir / KEY_FILE))
        if resumed:
            meta = read_pointer(run_dir)
            ledger.resume(int(meta.get("ledger_entries", 0)), str(meta.get("ledger_head", "")))
    except LedgerError as e:
        raise CheckpointError(str(e)) from None
    return ledger


def _cap_bytes(cfg: RunConfig) -> int | None:
    return None if cfg.client_memory_mb is None else int(cfg.client_memory_mb * 2**20)


def _client_store(cfg: RunConfig, run_dir: Path | None) -> ClientStore:
    """Where a simulation's per-client states live: segments in ``RUN_DIR/clients`` (so that
    checkpoints write only what changed); without a run folder, in memory, spilling to a
    temporary folder past ``--client-memory-mb``."""
    return ClientStore(run_dir / CLIENTS_DIR if run_dir is not None else None, _cap_bytes(cfg))


def _label_counts(fed: Federation) -> list[list[int]] | None:
    """The label histograms [clients][classes] of the first ``LABEL_CLIENTS`` training clients
    (all of a small federation; a bounded, cheap sample of a huge one, whose clients may be
    built on demand), for the label plot; None in deployment (the server holds no data), for
    text (the labels are next characters), and under DP (the counts are raw data statistics,
    outside the guarantee)."""
    if not isinstance(fed.pool, SimulationPool) or fed.cfg.dataset == "shakespeare" or fed.dp is not None \
            or fed.dataset.clients[0].train_y.is_floating_point():
        return None
    k = fed.dataset.num_classes
    first = range(min(LABEL_CLIENTS, fed.dataset.num_clients))
    return [torch.bincount(fed.dataset.clients[c].train_y, minlength=k).tolist() for c in first]


def _write_outputs(run_dir: Path, tracker: RunTracker, params: Params, per_client: dict, cfg: RunConfig,
                   label_counts: list[list[int]] | None = None, ledger: dict | None = None) -> None:
    from metafed.plots import plot_run

    write_text_atomic(run_dir / "final.safetensors", save_bytes({k: v.contiguous() for k, v in params.items()}))
    tracker.write_csv()
    final = tracker.rows[-1] if tracker.rows else {}
    tracker.write_summary({
        "algorithm": cfg.algorithm.name, "dataset": cfg.dataset, "backend": cfg.backend, "rounds": cfg.rounds,
        "final": final, "per_client_accuracy": per_client,
        "weighting": "*_accuracy is sample-weighted over clients' test samples; *_accuracy_mean is unweighted",
        "torch": torch.__version__, "privacy": privacy_summary(cfg, final), **provenance(),
        "client_label_counts": label_counts,
        "ledger": ledger,  # the chain head to publish (docs/incentives.md), when the run keeps a ledger
    })
    if tracker.rows:
        plot_run(run_dir)


__all__ = ["run", "build_federation", "check_deployable", "RunResult", "ConfigError", "CheckpointError", "RunFolderError"]
