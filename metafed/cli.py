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

from metafed.cli_options import with_config_flags

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="metafed: federated and meta-federated (personalized) learning on PyTorch.")


def _show_version(value: bool) -> None:
    if value:
        from metafed.version import __version__

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


def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override it",
                                          rich_help_panel="Run"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this folder from its last checkpoint",
                                          rich_help_panel="Run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder given as --out",
                                   rich_help_panel="Run"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)",
                                   rich_help_panel="Run"),
    seeds: Optional[str] = typer.Option(None, help="run once per seed, e.g. 0,1,2: OUT/seed-K each, and "
                                        "OUT/seeds.json with the mean ± std of the final metrics",
                                        rich_help_panel="Run"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each round's timing and the engine's "
                                 "decisions", rich_help_panel="Run"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="errors and the final line only: no progress, no "
                               "warnings", rich_help_panel="Run"),
    **values,
) -> None:
    """Run a federated job (or resume one) and write its run folder. Every config key is a
    flag; `metafed config show` prints them all with their values."""
    from metafed.cli_options import parse_list_values
    from metafed.config import build_config
    from metafed.run import run as run_job

    if verbose and quiet:
        _fail("--verbose and --quiet: choose one")
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        values["progress"] = False
    with _one_line_errors():
        flags = {**parse_list_values(values), **_parse_sets(set_)}
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
    scores = "  ".join(f"{key}={final[key]:.4f}" for key in ("global_accuracy", "personalized_accuracy")
                       if key in final)  # FedMD and FD have no global model
    typer.echo(f"done: {result.run_dir}  {scores}")


app.command(short_help="Run a federated job (or resume one) into a run folder.")(with_config_flags(run))


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
        run_job(cfg.updated(seed=value, out=out), overwrite=overwrite)
    summary = summarize_seeds(dirs, Path(cfg.out))
    for key, stats in summary.items():
        if key != "runs":
            typer.echo(f"{key}: {stats['mean']:.4f} ± {stats['std']:.4f} over seeds {values}")
    typer.echo(f"done: {Path(cfg.out) / 'seeds.json'}")


def sweep(
    grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,...: one axis of the grid (repeatable; the "
                                   "sweep runs every combination)", rich_help_panel="Sweep"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config every point starts from",
                                          rich_help_panel="Sweep"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)",
                                   rich_help_panel="Sweep"),
    target: float = typer.Option(0.8, help="global accuracy whose first round the table reports",
                                 rich_help_panel="Sweep"),
    **values,
) -> None:
    """Run a config over a grid of values (e.g. --grid lr=0.01,0.1 --grid seed=0,1): OUT/<point>
    per combination, then OUT/compare.md and overlaid curves. Run it again to continue an
    interrupted sweep: finished points are kept, interrupted ones resume."""
    from metafed.cli_options import parse_list_values
    from metafed.sweep import parse_grid, plan_sweep, run_sweep

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _one_line_errors():
        base = {**parse_list_values(values), **_parse_sets(set_)}
        out = base.pop("out", None)
        if out is None:
            _fail("--out SWEEP_DIR is required (the folder the sweep writes)")
        axes = parse_grid(grid)
        plan = plan_sweep(config, base, axes, Path(out))
        table = run_sweep(plan, axes, Path(out), target, echo=typer.echo)
    typer.echo(table.rstrip())
    typer.echo(f"done: {Path(out) / 'compare.md'}")


app.command(short_help="Run a config over a grid of values, then compare the runs.")(with_config_flags(sweep))


config_app = typer.Typer(no_args_is_help=True, help="Inspect run configurations.")
app.add_typer(config_app, name="config")


def _resolved_config(config: Optional[Path], set_: list[str], values: dict):
    """The config a `config` subcommand resolves: the file, the flags, then ``--set``."""
    from metafed.cli_options import parse_list_values
    from metafed.config import build_config

    return build_config(config, **{**parse_list_values(values), **_parse_sets(set_)})


def config_show(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override it",
                                          rich_help_panel="Run"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)",
                                   rich_help_panel="Run"),
    **values,
) -> None:
    """Print the resolved config (file, flags, protocol and defaults) as YAML that `metafed run
    -c` loads: by section, the algorithm's parameters under `algorithm:`, each key with its
    description and whether it was set, and the algorithm's paper."""
    from metafed.config.show import show_config

    with _one_line_errors():
        typer.echo(show_config(_resolved_config(config, set_, values)), nl=False)


config_app.command("show", short_help="Print the resolved config as loadable YAML.")(
    with_config_flags(config_show))


def config_hash(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; flags override it",
                                          rich_help_panel="Run"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set key=value (repeatable)",
                                   rich_help_panel="Run"),
    **values,
) -> None:
    """Print the SHA-256 a node pins this run by (node config run-sha256=...): every section of
    the resolved config but `execution`. A node so pinned refuses any other run."""
    from metafed.deploy.policy import run_sha256

    with _one_line_errors():
        typer.echo(run_sha256(_resolved_config(config, set_, values)))


config_app.command("hash", short_help="Print the SHA-256 a node pins this run by.")(with_config_flags(config_hash))


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


@app.command("deploy-local", short_help="A real Flower deployment on this machine (SuperLink + N SuperNodes).")
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
    isolation: str = typer.Option("warm", help="warm: each node one long-lived worker (metafed node); "
                                  "subprocess: Flower's default, one process per message"),
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
        if isolation not in ("warm", "subprocess"):
            _fail(f"--isolation must be warm or subprocess, not {isolation!r}")
        deploy_local(cfg, clients, out, insecure=insecure, overwrite=overwrite, resume=resume,
                     round_timeout=round_timeout, timeout=timeout, echo=_echo_progress, warm=isolation == "warm")
        typer.echo(f"done: {out}")


@app.command("node", short_help="One party's SuperNode, warm: one long-lived worker serves every message.",
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def node_cmd(ctx: typer.Context,
             poll_interval: float = typer.Option(0.1, "--poll-interval",
                                                 help="longest wait between the worker's checks for a message"),
             idle_poll: float = typer.Option(0.5, "--idle-poll", help="seconds the SuperNode waits before asking "
                                             "the SuperLink again when no message waited (Flower's own: 3)"),
             client_app: list[str] = typer.Option([], "--client-app", help="a ClientApp this node serves, "
                                                  "module:attribute from its own packages (repeatable; default "
                                                  "metafed's); a run naming any other is refused")) -> None:
    """Run this party's node: Flower's SuperNode with --isolation process and one metafed
    worker that imports once and serves every message (restarted if it dies). Every other
    argument is a flower-supernode flag, passed through: --superlink, --node-config (the
    node's data and its own policy), --root-certificates, --auth-supernode-private-key."""
    from metafed.deploy.warm_node import NodeArgsError, run_node

    try:
        code = run_node(list(ctx.args), poll_interval, echo=typer.echo, idle_poll=idle_poll,
                        client_apps=tuple(client_app))
    except NodeArgsError as e:
        _fail(str(e))
    raise typer.Exit(code)


@app.command("secagg-keys", short_help="Identity keys and roster for secure aggregation in deployment.")
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


ledger_app = typer.Typer(no_args_is_help=True, help="Check and read a run's incentive ledger.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("verify", short_help="Check every entry's chain link, hash and signature.")
def ledger_verify(run_dir: Path = typer.Argument(..., help="a run folder written with --contribution"),
                  public_key: Optional[str] = typer.Option(None, "--public-key",
                      help="the server's Ed25519 public key (hex) to pin; default: the ledger header's")) -> None:
    """Exit 0 if every entry links to the one before, matches its hash and carries the server's
    signature; otherwise name each problem and exit 1."""
    from metafed.incentive.ledger import LEDGER_FILE, LedgerError, verify

    with _one_line_errors():
        try:
            result = verify(run_dir / LEDGER_FILE, public_key)
        except LedgerError as e:
            _fail(str(e))
    if result.ok:
        typer.echo(f"ok: {result.entries} entries, head {result.head}, signed by {result.public_key}")
        return
    for problem in result.problems:
        typer.echo(f"TAMPERED: {problem}", err=True)
    raise typer.Exit(code=1)


@ledger_app.command("show", short_help="Print each client's balance and the chain head.")
def ledger_show(run_dir: Path = typer.Argument(..., help="a run folder written with --contribution")) -> None:
    """Balances from the ledger (total reward, total contribution, rounds paid, rounds flagged),
    highest reward first; then the chain head to publish (see docs/incentives.md)."""
    from metafed.incentive.ledger import LEDGER_FILE, LedgerError, balances, verify

    with _one_line_errors():
        try:
            result, table = verify(run_dir / LEDGER_FILE), balances(run_dir / LEDGER_FILE)
        except LedgerError as e:
            _fail(str(e))
    typer.echo(f"{'client':>10} {'reward':>12} {'contribution':>14} {'rounds':>7} {'flagged':>8}")
    for client, b in sorted(table.items(), key=lambda kv: -kv[1]["reward"]):
        typer.echo(f"{client:>10} {b['reward']:12.3f} {b['contribution']:14.5f} {b['rounds']:7d} {b['flagged']:8d}")
    status = "verified" if result.ok else f"DOES NOT VERIFY ({len(result.problems)} problems: metafed ledger verify)"
    typer.echo(f"{result.entries} entries, head {result.head} ({status})")


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
