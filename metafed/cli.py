"""The ``metafed`` command line: run, plot, datasets, algorithms.

Every user error (bad flag value, unknown name, config typo, missing data) ends with one
line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="metafed: federated and meta-federated (personalized) learning on PyTorch.")


def _show_version(value: bool) -> None:
    if value:
        from metafed import __version__

        typer.echo(f"metafed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """metafed: federated and meta-federated (personalized) learning on PyTorch."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _parse_sets(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            _fail(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            _fail(f"--set {key}: {value!r} is not a valid value")
    return out


@contextmanager
def _one_line_errors():
    """Every failure below a command ends as one line on stderr and exit code 2: known user
    errors with their own message, anything else with its type (METAFED_DEBUG=1 re-raises)."""
    from metafed.checkpoint import CheckpointError
    from metafed.config import ConfigError
    from metafed.privacy.secagg import SecAggAbort
    from metafed.run_folder import RunFolderError

    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except (ConfigError, CheckpointError, RunFolderError, SecAggAbort, ValueError, OSError) as e:
        _fail(_first_line(e))
    except Exception as e:  # noqa: BLE001 - the CLI boundary: never a traceback
        if os.environ.get("METAFED_DEBUG"):
            raise
        _fail(f"{type(e).__name__}: {_first_line(e)} (set METAFED_DEBUG=1 for the traceback)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override it"),
    algorithm: Optional[str] = typer.Option(None, help="see `metafed algorithms`"),
    dataset: Optional[str] = typer.Option(None, help="digits | mnist | femnist | shakespeare | synthetic"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with mnist/, femnist/, shakespeare/ (or $METAFED_DATA)"),
    model: Optional[str] = typer.Option(None, help="logistic | mlp | cnn | small-cnn | lstm (default: per dataset)"),
    rounds: Optional[int] = typer.Option(None),
    num_clients: Optional[int] = typer.Option(None, help="clients to create (digits, mnist, synthetic)"),
    clients_per_round: Optional[int] = typer.Option(None),
    local_epochs: Optional[int] = typer.Option(None),
    local_steps: Optional[int] = typer.Option(None, help="overrides --local-epochs"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="client learning rate"),
    mu: Optional[float] = typer.Option(None, help="FedProx proximal weight"),
    inner_lr: Optional[float] = typer.Option(None, help="alpha of MAML / Meta-SGD / Per-FedAvg"),
    personal_lr: Optional[float] = typer.Option(None, help="pFedMe / Ditto personal learning rate"),
    pfedme_lambda: Optional[float] = typer.Option(None),
    ditto_lambda: Optional[float] = typer.Option(None),
    aggregator: Optional[str] = typer.Option(None, help="mean | attention | median | trimmed-mean | krum | "
                                             "multi-krum | bulyan | centered-clipping | fltrust"),
    byzantine_f: Optional[int] = typer.Option(None, help="attackers a robust rule tolerates per round"),
    attack: Optional[str] = typer.Option(None, help="label-flip | sign-flip | gaussian | alie | ipm | backdoor"),
    malicious_fraction: Optional[float] = typer.Option(None),
    dp: Optional[str] = typer.Option(None, help="central | local: client-level differential privacy"),
    dp_clip: Optional[float] = typer.Option(None),
    dp_noise_multiplier: Optional[float] = typer.Option(None),
    target_epsilon: Optional[float] = typer.Option(None, help="calibrate the noise multiplier to this epsilon"),
    dp_delta: Optional[float] = typer.Option(None),
    dp_adaptive_clip: Optional[bool] = typer.Option(None, "--dp-adaptive-clip/--dp-fixed-clip"),
    dp_target_quantile: Optional[float] = typer.Option(None, help="adaptive clipping: target quantile of norms"),
    dp_clip_lr: Optional[float] = typer.Option(None, help="adaptive clipping: learning rate of the clip norm"),
    dp_count_noise: Optional[float] = typer.Option(None, help="adaptive clipping: std of the count noise"),
    dp_accountant: Optional[str] = typer.Option(None, help="rdp | pld"),
    secagg_range: Optional[float] = typer.Option(None, help="fixed-point range [-R, R] of n_i * update"),
    secagg_bits: Optional[int] = typer.Option(None, help="fixed-point fraction bits"),
    attention_temperature: Optional[float] = typer.Option(None, help="softmax temperature of attention"),
    fltrust_root_size: Optional[int] = typer.Option(None, help="FLTrust: server's clean root samples"),
    clip_tau: Optional[float] = typer.Option(None, help="centered clipping radius"),
    client_sampling: Optional[str] = typer.Option(None, help="fixed | poisson"),
    dropout: Optional[float] = typer.Option(None, help="fraction of sampled clients that never reply"),
    secure_aggregation: Optional[bool] = typer.Option(None, "--secure-aggregation/--no-secure-aggregation"),
    secagg_threshold: Optional[int] = typer.Option(None),
    secagg_neighbours: Optional[int] = typer.Option(None, help="SecAgg+ neighbourhood size"),
    secagg_dropout: Optional[float] = typer.Option(None, help="fraction dropping after key sharing"),
    min_clients: Optional[int] = typer.Option(None, help="skip a round (model unchanged) with fewer valid replies"),
    attention_score: Optional[str] = typer.Option(None, help="loss | cosine | labels"),
    server_optimizer: Optional[str] = typer.Option(None, help="sgd | adam | yogi | adagrad"),
    server_lr: Optional[float] = typer.Option(None, help="default per optimizer: sgd 1.0, adam/yogi 0.01, "
                                              "adagrad 0.1"),
    protocol: Optional[str] = typer.Option(None, help="equal-budget (one adaptation budget for all methods) | "
                                           "paper (each algorithm's paper recipe; see docs/protocols.md)"),
    weighting: Optional[str] = typer.Option(None, help="samples | uniform: how client updates are averaged"),
    personal_eval: Optional[str] = typer.Option(None, help="adapt | stored (score each client's stored "
                                                "personal model: pfedme, ditto, meta-updater)"),
    standardize: Optional[bool] = typer.Option(None, "--standardize/--no-standardize",
                                               help="per-feature standardisation (mnist, digits, femnist)"),
    meta_formulation: Optional[str] = typer.Option(None, help="meta-updater: learned-step | delta (the seed "
                                                   "document's formulation)"),
    reptile_anneal: Optional[bool] = typer.Option(None, "--reptile-anneal/--no-reptile-anneal",
                                                  help="Reptile: anneal eps linearly to 0"),
    server_momentum: Optional[float] = typer.Option(None),
    partition: Optional[str] = typer.Option(None, help="iid | dirichlet | shards | quantity"),
    dirichlet_alpha: Optional[float] = typer.Option(None),
    synthetic_alpha: Optional[float] = typer.Option(None),
    synthetic_beta: Optional[float] = typer.Option(None),
    synthetic_iid: Optional[bool] = typer.Option(None, "--synthetic-iid/--synthetic-non-iid"),
    stragglers: Optional[float] = typer.Option(None, help="fraction of sampled clients that do partial work"),
    heldout_fraction: Optional[float] = typer.Option(None, help="fraction of clients that never train"),
    personalize_steps: Optional[int] = typer.Option(None),
    eval_every: Optional[int] = typer.Option(None),
    eval_clients: Optional[int] = typer.Option(None, help="evaluate a fixed seeded sample of N training clients"),
    eval_train_loss: Optional[bool] = typer.Option(None, "--eval-train-loss/--no-eval-train-loss",
                                                   help="the global model's loss over all training data"),
    backend: Optional[str] = typer.Option(None, help="loop | vectorized"),
    chunk_size: Optional[int] = typer.Option(None, help="vectorized: clients per chunk"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="vectorized: torch.compile the step"),
    seed: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="run folder to write"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this folder from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder given as --out"),
    insecure_reproducible_privacy: Optional[bool] = typer.Option(
        None, "--insecure-reproducible-privacy", help="TESTS ONLY: seeded DP noise and sampling; the privacy "
        "guarantee does NOT hold (anyone with the seed can remove the noise)"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)"),
    seeds: Optional[str] = typer.Option(None, help="run once per seed, e.g. 0,1,2: OUT/seed-K each, and "
                                        "OUT/seeds.json with the mean ± std of the final metrics"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run a federated job (or resume one) and write its run folder."""
    from metafed.config import build_config
    from metafed.run import run as run_job

    flags = dict(algorithm=algorithm, dataset=dataset, data_dir=data_dir, model=model, rounds=rounds,
                 num_clients=num_clients, clients_per_round=clients_per_round, local_epochs=local_epochs,
                 local_steps=local_steps, batch_size=batch_size, lr=lr, mu=mu, server_optimizer=server_optimizer,
                 inner_lr=inner_lr, personal_lr=personal_lr, pfedme_lambda=pfedme_lambda, ditto_lambda=ditto_lambda,
                 aggregator=aggregator, attention_score=attention_score, byzantine_f=byzantine_f, attack=attack,
                 malicious_fraction=malicious_fraction, dp=dp, dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier,
                 target_epsilon=target_epsilon, dp_delta=dp_delta, dp_adaptive_clip=dp_adaptive_clip,
                 dp_target_quantile=dp_target_quantile, dp_clip_lr=dp_clip_lr, dp_count_noise=dp_count_noise,
                 dp_accountant=dp_accountant, secagg_range=secagg_range, secagg_bits=secagg_bits,
                 attention_temperature=attention_temperature, fltrust_root_size=fltrust_root_size, clip_tau=clip_tau,
                 client_sampling=client_sampling, dropout=dropout, min_clients=min_clients,
                 secure_aggregation=secure_aggregation,
                 secagg_threshold=secagg_threshold, secagg_neighbours=secagg_neighbours, secagg_dropout=secagg_dropout,
                 server_lr=server_lr, server_momentum=server_momentum, partition=partition, protocol=protocol,
                 weighting=weighting, personal_eval=personal_eval, standardize=standardize,
                 reptile_anneal=reptile_anneal, meta_formulation=meta_formulation,
                 dirichlet_alpha=dirichlet_alpha, synthetic_alpha=synthetic_alpha, synthetic_beta=synthetic_beta,
                 synthetic_iid=synthetic_iid, stragglers=stragglers, heldout_fraction=heldout_fraction,
                 personalize_steps=personalize_steps, eval_every=eval_every,
                 eval_clients=eval_clients, eval_train_loss=eval_train_loss, backend=backend, chunk_size=chunk_size,
                 compile=compile, seed=seed, out=out, progress=progress,
                 insecure_reproducible_privacy=insecure_reproducible_privacy)
    flags.update(_parse_sets(set_))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _one_line_errors():
        cfg = build_config(config, **flags)
        if cfg.out is None and resume is None:
            _fail("--out RUN_DIR is required (the folder the run writes)")
        if resume is not None and overwrite:
            _fail("--resume continues a run and --overwrite replaces one: choose one")
        if seeds is not None:
            _run_seeds(cfg, seeds, resume, overwrite)
            return
        result = run_job(cfg, resume=resume, overwrite=overwrite)
    final = result.rows[-1] if result.rows else {}
    typer.echo(f"done: {result.run_dir}  global_accuracy={final.get('global_accuracy', float('nan')):.4f}  "
               f"personalized_accuracy={final.get('personalized_accuracy', float('nan')):.4f}")


def _run_seeds(cfg, seeds: str, resume: Optional[Path], overwrite: bool) -> None:
    """``--seeds 0,1,2``: the config once per seed into OUT/seed-K, then their mean ± std."""
    from metafed.compare import summarize_seeds
    from metafed.run import run as run_job

    if resume is not None:
        _fail("--seeds starts new runs: resume each OUT/seed-K folder on its own")
    try:
        values = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        _fail(f"--seeds expects integers separated by commas, got {seeds!r}")
    if not values or len(set(values)) != len(values):
        _fail(f"--seeds needs distinct seeds, got {seeds!r}")
    dirs = [Path(cfg.out) / f"seed-{v}" for v in values]
    for value, out in zip(values, dirs):
        run_job(cfg.model_copy(update={"seed": value, "out": out}), overwrite=overwrite)
    summary = summarize_seeds(dirs, Path(cfg.out))
    for key, stats in summary.items():
        if key != "runs":
            typer.echo(f"{key}: {stats['mean']:.4f} ± {stats['std']:.4f} over seeds {values}")
    typer.echo(f"done: {Path(cfg.out) / 'seeds.json'}")


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="run folders written by `metafed run`"),
            out: Path = typer.Option(Path("compare"), help="folder for the plots and compare.md"),
            target: float = typer.Option(0.8, help="global accuracy whose first round is reported")) -> None:
    """Overlay several runs' accuracy and loss curves and tabulate final, best and rounds to target."""
    from metafed.compare import compare_runs

    with _one_line_errors():
        table, written = compare_runs(run_dirs, out, target)
    typer.echo(table.rstrip())
    for path in written:
        typer.echo(str(path))


@app.command("deploy-local")
def deploy_local_cmd(
    clients: int = typer.Option(..., "--clients", help="SuperNodes to start, one data partition each"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (any `metafed run` key)"),
    out: Path = typer.Option(..., "--out", help="run folder the ServerApp writes"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP between the processes (loopback only)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    round_timeout: float = typer.Option(300.0, help="seconds the server waits for a round's replies"),
    timeout: float = typer.Option(1800.0, help="seconds the whole run may take before it is stopped"),
) -> None:
    """A real deployment on this machine: a SuperLink and N SuperNodes (Flower) on 127.0.0.1,
    TLS with a throwaway CA, metafed's ServerApp and ClientApp; writes the same run folder
    as `metafed run`, then tears everything down."""
    from metafed.config import build_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _one_line_errors():
        try:
            from metafed.deploy.local import deploy_local
        except ImportError:
            _fail('deploy-local needs the deploy extra: pip install -c constraints.txt -e ".[deploy]"')
        cfg = build_config(config, **_parse_sets(set_))
        if resume and overwrite:
            _fail("--resume continues a run and --overwrite replaces one: choose one")
        deploy_local(cfg, clients, out, insecure=insecure, overwrite=overwrite, resume=resume,
                     round_timeout=round_timeout, timeout=timeout, echo=_echo_progress)
        typer.echo(f"done: {out}")


@app.command("secagg-keys")
def secagg_keys(
    clients: int = typer.Option(..., "--clients", help="number of clients (ids 0..N-1)"),
    out: Path = typer.Option(..., "--out", help="folder for roster.json and client-<i>.key"),
) -> None:
    """Trusted set-up for secure aggregation in a deployment: one Ed25519 identity key per
    client (give client i's key only to the party that runs it) and the roster of public
    keys (give it to every party and to the ServerApp)."""
    from metafed.deploy.identity import make_identities

    with _one_line_errors():
        if clients < 1:
            _fail("--clients must be at least 1")
        if out.exists() and any(out.iterdir()):
            _fail(f"{out} exists and is not empty: keys are never overwritten")
        roster, keys = make_identities(out, clients)
        typer.echo(f"roster: {roster}\nkeys:   {keys[0].parent}/client-<i>.key (mode 0600)")


def _echo_progress(line: str) -> None:
    """Stream the deployment's log, without the transport's per-request chatter."""
    if line and "HTTP Request:" not in line and " DEBUG " not in line and not line.startswith("DEBUG"):
        typer.echo(line)


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="a run folder written by `metafed run`")) -> None:
    """(Re)draw a run folder's PNG plots."""
    from metafed.plots import plot_run

    with _one_line_errors():
        for path in plot_run(run_dir):
            typer.echo(str(path))


@app.command()
def datasets() -> None:
    """List the datasets metafed can load."""
    from metafed.data import DATASETS

    for name, text in DATASETS.items():
        typer.echo(f"{name:12s} {text}")


@app.command()
def algorithms() -> None:
    """List every algorithm with one line, its paper, and what --protocol paper sets for it."""
    from metafed.algorithms import ALGORITHMS
    from metafed.protocols import paper_recipe

    for name, spec in ALGORITHMS.items():
        typer.echo(f"{name:20s} {spec.summary}  [{spec.paper}]")
        recipe = paper_recipe({"algorithm": name})
        settings = ", ".join(f"{k}={v}" for k, v in recipe.items()) or "the defaults"
        typer.echo(f"{'':20s} --protocol paper: {settings}")


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors (an unknown flag, a word where a number goes) are one line
    on stderr with exit code 2, like every other user error, not click's usage box."""
    try:  # typer >= 0.24 bundles its own click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:  # older typer (e.g. beside flwr) depends on click
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = app(args=argv, prog_name="metafed", standalone_mode=False)
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        code = 0
    except UsageError as e:
        typer.echo(f"error: {e.format_message().splitlines()[0]} (see `metafed --help`)", err=True)
        code = 2
    except ClickException as e:
        typer.echo(f"error: {e.format_message().splitlines()[0]}", err=True)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted; resume with `metafed run --resume RUN_DIR`", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
