"""metafed's Flower ServerApp: drives metafed's own round loop (sampling, validation, the
aggregation pipeline, DP, server optimizer, accountant, checkpoints, run folder) over the
SuperNodes of the run, through :class:`~metafed.deploy.pool.FlowerPool`.

Run config keys (``flwr run --run-config``): ``config-file`` (the metafed RunConfig as
JSON, on the SuperLink's host), ``out`` (the run folder), ``num-nodes`` (SuperNodes to wait
for), ``resume`` (continue the run in ``out``), ``round-timeout`` and ``connect-timeout``
(seconds), ``secagg-roster`` (the identity roster, for secure aggregation)."""
from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from metafed.config import RunConfig
from metafed.deploy.identity import load_roster
from metafed.deploy.pool import FlowerPool
from metafed.run import run

def make_server_app(model=None) -> ServerApp:
    """A Flower ServerApp driving metafed's round loop; ``model``: your own nn.Module factory
    (the same one your ClientApp uses), else the run config's reference model."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, context, model)

    return app


def main(grid: Grid, context: Context, model=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "flwr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from metafed.deploy.supernode_polls import shorten_object_pulls

    shorten_object_pulls()  # replies fetched without Flower's 1 s first back-off (docs/deploy.md)
    rc = context.run_config
    cfg = RunConfig(**json.loads(Path(str(rc["config-file"])).read_text()))
    out = Path(str(rc["out"]))
    resume = bool(rc.get("resume", False))
    cfg = cfg.updated(out=out, progress=False, backend="loop")
    roster_path = str(rc.get("secagg-roster", ""))
    roster = load_roster(roster_path) if roster_path else None
    pool = FlowerPool(grid, cfg, int(rc["num-nodes"]), float(rc.get("connect-timeout", 60.0)),
                      float(rc.get("round-timeout", 300.0)), roster)
    result = run(RunConfig(rounds=cfg.rounds, progress=False) if resume else cfg, resume=out if resume else None,
                 pool=pool, model=model)
    final = result.rows[-1] if result.rows else {}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    logging.getLogger("metafed.deploy").info("run finished: %s global_accuracy=%s server_peak_rss_mib=%.1f", out,
                                             final.get("global_accuracy"), peak_mib)


app = make_server_app()
