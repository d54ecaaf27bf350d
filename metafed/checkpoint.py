"""Atomic per-round checkpoints: safetensors for tensors, JSON for the rest. Never pickle.

Layout in the run folder: ``checkpoint.json`` points at ``checkpoint-<round>.safetensors``
and records its SHA-256. The tensor file is written completely and fsynced before the
pointer is atomically replaced, so a run killed at any moment resumes from the last
committed round. The pointer is untrusted input when read back: its file name must be
exactly ``checkpoint-<round>.safetensors`` inside the folder, the checksum must match, and
every tensor name must belong to a known group.

Client states (personal models, residuals) are not in that file when the store lives in the
run folder (``clients/``, see :mod:`metafed.client_store`): the checkpoint commits the
store's manifest instead (``client_segments`` in the pointer), so a round writes only the
states that changed since the last checkpoint. A memory-only store (the Python API without
a run folder, older checkpoints) is saved in the tensor file as ``client/<id>/<path>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from metafed.algorithms.base import ServerState
from metafed.client_store import ClientStore, ClientStoreError
from metafed.run_folder import write_text_atomic

POINTER = "checkpoint.json"
CLIENTS_DIR = "clients"  # the client store's segments, inside the run folder
GROUPS = ("params", "opt", "extra", "stages", "client")
# checkpoints written before the aggregation pipeline kept stage state under these extra keys
LEGACY_STAGE_KEYS = {"dp.clip": ("central-dp", "clip"), "dp.ledger": ("privacy-ledger", "ledger")}
_NAME = re.compile(r"checkpoint-(\d+)\.safetensors")


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
    flat.update({f"stages/{slot}/{k}": v for slot, values in state.stages.items() for k, v in values.items()})
    if clients.folder is None:
        flat.update({f"client/{k}": v for k, v in clients.to_tensors().items()})
    return {k: v.contiguous() for k, v in flat.items()}


def save_checkpoint(run_dir: Path, rnd: int, state: ServerState, clients: ClientStore, meta: dict) -> None:
    """Commit round ``rnd``: the tensor file, the client store's new segments (only what
    changed), then the pointer naming both, atomically; superseded files go last."""
    name = f"checkpoint-{rnd}.safetensors"
    blob = save_bytes(_flatten(state, clients))
    write_text_atomic(run_dir / name, blob)
    segments = {"client_segments": clients.commit()} if clients.folder is not None else {}
    previous = _previous_file(run_dir)
    write_text_atomic(run_dir / POINTER, json.dumps({"round": rnd, "file": name,
                                                     "sha256": hashlib.sha256(blob).hexdigest(), **segments, **meta},
                                                    indent=1))
    if previous and previous != name:
        (run_dir / previous).unlink(missing_ok=True)
    if clients.folder is not None:
        clients.collect()


def _previous_file(run_dir: Path) -> str | None:
    """The tensor file the current pointer names, only if it is a valid checkpoint name."""
    try:
        meta = read_pointer(run_dir)
    except CheckpointError:
        return None
    name = meta.get("file")
    return name if isinstance(name, str) and _NAME.fullmatch(name) else None


def read_pointer(run_dir: Path) -> dict:
    path = run_dir / POINTER
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no {POINTER}: nothing to resume") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, IsADirectoryError) as e:
        raise CheckpointError(f"{path} is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    return meta


def load_checkpoint(run_dir: Path) -> Checkpoint:
    meta = read_pointer(run_dir)
    rnd, name, digest = meta.get("round"), meta.get("file"), meta.get("sha256")
    if type(rnd) is not int or rnd < 1:
        raise CheckpointError(f"{run_dir / POINTER}: 'round' must be a positive integer, got {rnd!r}")
    if not isinstance(name, str) or name != f"checkpoint-{rnd}.safetensors":
        raise CheckpointError(f"{run_dir / POINTER}: 'file' must be checkpoint-{rnd}.safetensors inside the run "
                              f"folder, got {name!r}")
    if not isinstance(digest, str):
        raise CheckpointError(f"{run_dir / POINTER}: 'sha256' checksum missing")
    path = run_dir / name
    if path.is_symlink():
        raise CheckpointError(f"checkpoint file {path} is a symbolic link: refused")
    try:
        blob = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"checkpoint file {path} does not match its checksum: corrupt or modified")
    try:
        flat = load_bytes(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {e}") from None
    groups: dict[str, dict] = {g: {} for g in GROUPS}
    for key, v in flat.items():
        head, _, rest = key.partition("/")
        if head not in groups or not rest:
            raise CheckpointError(f"checkpoint file {path} holds an unexpected tensor {key!r}")
        groups[head][rest] = v
    state = ServerState(groups["params"], groups["opt"], *_stage_slots(groups["extra"], groups["stages"], path))
    try:
        if "client_segments" in meta:
            folder = run_dir / CLIENTS_DIR
            if folder.is_symlink() or not folder.is_dir():
                raise ClientStoreError(f"{folder} (the clients' states) is missing")
            clients = ClientStore.open(folder, meta["client_segments"])
        else:
            clients = ClientStore.from_tensors(groups["client"])
    except ClientStoreError as e:
        raise CheckpointError(f"checkpoint in {run_dir}: {e}") from None
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint file {path} has malformed client states: {e}") from None
    return Checkpoint(rnd, state, clients, meta)


def _stage_slots(extra: dict, flat: dict, path: Path) -> tuple[dict, dict]:
    """(extra, stages): ``stages/<slot>/<key>`` tensors by slot, and the stage state an older
    checkpoint kept in ``extra`` (:data:`LEGACY_STAGE_KEYS`) moved to its slot."""
    stages: dict[str, dict] = {}
    for key, v in flat.items():
        slot, _, name = key.partition("/")
        if not slot or not name:
            raise CheckpointError(f"checkpoint file {path} holds an unexpected tensor 'stages/{key}'")
        stages.setdefault(slot, {})[name] = v
    extra = dict(extra)
    for key, (slot, name) in LEGACY_STAGE_KEYS.items():
        if key in extra:
            stages.setdefault(slot, {}).setdefault(name, extra.pop(key))
    return extra, stages
