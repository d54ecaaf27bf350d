"""Atomic per-round checkpoints: safetensors for tensors, JSON for the rest. Never pickle.

Layout in the run folder: ``checkpoint.json`` points at ``checkpoint-<round>.safetensors``.
The tensor file is written completely and fsynced before the pointer is atomically
replaced, so a run killed at any moment resumes from the last committed round.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metafed.algorithms.base import ServerState
from metafed.client_store import ClientStore

POINTER = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    state: ServerState
    clients: ClientStore
    meta: dict


def _flatten(state: ServerState, clients: ClientStore) -> dict:
    flat = {f"params/{k}": v for k, v in state.params.items()}
    flat.update({f"opt/{k}": v for k, v in state.opt_state.items()})
    flat.update({f"extra/{k}": v for k, v in state.extra.items()})
    flat.update({f"client/{k}": v for k, v in clients.to_tensors().items()})
    return {k: v.contiguous() for k, v in flat.items()}


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, rnd: int, state: ServerState, clients: ClientStore, meta: dict) -> None:
    name = f"checkpoint-{rnd}.safetensors"
    tmp = run_dir / (name + ".tmp")
    save_file(_flatten(state, clients), str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / name)
    previous = read_pointer(run_dir) if (run_dir / POINTER).exists() else None
    _write_json_atomic(run_dir / POINTER, {"round": rnd, "file": name, **meta})
    if previous and previous.get("file") != name:
        (run_dir / previous["file"]).unlink(missing_ok=True)


def read_pointer(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / POINTER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no {POINTER}: nothing to resume") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{run_dir / POINTER} is corrupt: {e}") from None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    meta = read_pointer(run_dir)
    path = run_dir / meta.get("file", "")
    try:
        flat = load_file(str(path))
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {e}") from None
    groups: dict[str, dict] = {"params": {}, "opt": {}, "extra": {}, "client": {}}
    for key, v in flat.items():
        head, rest = key.split("/", 1)
        groups[head][rest] = v
    state = ServerState(groups["params"], groups["opt"], groups["extra"])
    return Checkpoint(int(meta["round"]), state, ClientStore.from_tensors(groups["client"]), meta)
