"""Optional experiment trackers (``--loggers tensorboard,mlflow,wandb``): each one a small
adapter over the same metric rows that ``metrics.jsonl`` holds, one row per round.

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``);
  extra ``[tensorboard]``.
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI``, else in ``RUN_DIR/mlflow.db`` (``mlflow ui
  --backend-store-uri sqlite:///RUN_DIR/mlflow.db``); the config as params; extra ``[mlflow]``.
- ``wandb``: a W&B run in ``RUN_DIR/wandb``, offline unless ``$WANDB_MODE`` says otherwise
  (these machines have no network); extra ``[wandb]``.

A resumed run continues the same tracker run: its id is kept in ``RUN_DIR/loggers.json``.
Under DP only what the guarantee covers leaves the machine: the rows sent to a tracker are
cut to the released keys (round, epsilon, the DP parameters); the run folder keeps all.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger("metafed")

LOGGERS = ("tensorboard", "mlflow", "wandb")
IDS_FILE = "loggers.json"
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # extras: same names


def _need(name: str):
    """The tracker's module, or an ImportError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise ImportError(f"--loggers {name} needs the {name} extra: pip install -c constraints.txt "
                          f"-e \".[{name}]\"") from None


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        writer = _need("tensorboard").SummaryWriter
        self.writer = writer(log_dir=str(run_dir / "tensorboard"))
        self.run_id = run_id or "tensorboard"
        if run_id is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["round"])

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        self.mlflow = _need("mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store read-only: a SQLite file in the run folder instead
            self.mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        if run_id is None:
            self.mlflow.set_experiment("metafed")
        run = self.mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        self.run_id = run.info.run_id
        if run_id is None:
            self.mlflow.log_params({k: str(v) for k, v in config.items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(_numbers(row), step=row["round"])

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        wandb = _need("wandb")
        self.run = wandb.init(project="metafed", name=run_dir.name, dir=str(run_dir), config=config, id=run_id,
                              resume="allow" if run_id else None, mode=os.environ.get("WANDB_MODE", "offline"))
        self.run_id = self.run.id

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["round"])

    def close(self) -> None:
        self.run.finish()


ADAPTERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}
def check_installed(names: Iterable[str]) -> None:
    """Fail before anything is written when a tracker's package is missing."""
    for name in names:
        _need(name)


class Trackers:
    """The configured trackers as one: ``log(row)`` each round, ``close()`` at the end."""

    def __init__(self, names: Iterable[str], run_dir: Path | None, config: dict, released: set[str] | None):
        self.released = released
        self.active = []
        names = list(names)
        if not names:
            return
        if run_dir is None:
            raise ValueError("--loggers write next to a run folder: give --out")
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        for name in names:
            self.active.append(ADAPTERS[name](run_dir, config, ids.get(name)))
        ids.update({name: tracker.run_id for name, tracker in zip(names, self.active)})
        ids_path.write_text(json.dumps(ids, indent=1))
        if released is not None:
            log.warning("under --dp the trackers receive only %s: the other metrics are outside the guarantee "
                        "and stay in the run folder", ", ".join(sorted(released)))

    def log(self, row: dict) -> None:
        if self.released is not None:
            row = {k: v for k, v in row.items() if k in self.released}
        for tracker in self.active:
            tracker.log(row)

    def close(self) -> None:
        for tracker in self.active:
            tracker.close()
