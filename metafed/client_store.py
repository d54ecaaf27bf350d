"""Per-client persistent state (personal models, residuals, meta-updaters) keyed by client id.

States are nested dicts of tensors. Small federations keep them all in memory. A store
opened on a folder (``ClientStore(folder=...)``: the run folder's ``clients/``) is
log-structured, so that 10^5 clients with personal models fit a memory cap and a
checkpoint costs what changed, not the whole federation:

- States live in memory, least recently used first out. Past ``memory_cap`` bytes the
  oldest are evicted; the ones changed since they were last written ("dirty") go to disk
  as one new **segment** file (safetensors, keys ``<client id>/<path>``).
- :meth:`commit` (each checkpoint) writes the remaining dirty states as one more segment
  and returns the **manifest**: the live segments, oldest first, with their SHA-256. A
  client's state is its copy in the newest segment that holds it. Segments are never
  rewritten: a new one holds newer copies, so a crash between commits leaves the last
  committed manifest intact; files it does not list are removed on the next commit or
  open.
- Segments whose copies are mostly stale are compacted at commit: their live copies are
  gathered into one new segment, keeping the disk within about twice the live state.

Segments are read back through safetensors' memory map, a client at a time; a segment
named by a manifest is checked against its SHA-256 the first time this process reads it.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from metafed import tree

# state the client keeps for the pipeline, not for its algorithm's program (which never sees it)
PRIVATE_KEYS = ("ef_residual",)
SEGMENT = re.compile(r"segment-(\d{8})\.safetensors")
COMPACT_BELOW = 0.5  # a segment whose live share of clients falls below this is compacted at commit


class ClientStoreError(RuntimeError):
    """A segment of the client store is missing, corrupt or not what the manifest says."""


def _nbytes(state: dict) -> int:
    return tree.nested_bytes(state) if state else 0


class ClientStore:
    """Client id -> state. ``folder``: where segments go (None: memory only; with a cap, a
    temporary folder removed with the store). ``memory_cap``: bytes of states kept in memory
    (None: no cap)."""

    def __init__(self, folder: Path | None = None, memory_cap: int | None = None) -> None:
        self._tmp = None
        if memory_cap is not None and folder is None:  # spill to a folder that lives as long as the store
            self._tmp = tempfile.TemporaryDirectory(prefix="metafed-clients-")
            folder = Path(self._tmp.name)
        self.folder, self.memory_cap = (Path(folder) if folder is not None else None), memory_cap
        self._mem: OrderedDict[int, dict] = OrderedDict()  # LRU: most recently used last
        self._mem_bytes = 0
        self._dirty: set[int] = set()
        self._where: dict[int, str] = {}  # client -> the segment with its newest written copy
        self._segments: dict[str, dict] = {}  # live segment -> {"sha256", "clients": set}
        self._verified: set[str] = set()  # segments written or checked by this process
        self._next = itertools.count()
        self.spilled_segments = 0  # segments written by eviction (for benchmarks and tests)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ the algorithm's view
    def get(self, client_id: int, default: Callable[[], dict]) -> dict:
        """The client's algorithm state, or ``default()`` for a client seen for the first time
        (not stored). Pipeline entries (``PRIVATE_KEYS``) are left out: see :meth:`private`."""
        state = {k: v for k, v in self._load(client_id).items() if k not in PRIVATE_KEYS}
        return state or default()

    def put(self, client_id: int, state: dict) -> None:
        """Store the client's algorithm state; its pipeline entries are kept."""
        kept = {k: v for k, v in self._load(client_id).items() if k in PRIVATE_KEYS}
        state = {k: v for k, v in state.items() if k not in PRIVATE_KEYS}
        if state or kept:
            self._store(client_id, {**tree.nested_map(lambda v: v.detach().clone(), state), **kept})

    def private(self, client_id: int, key: str):
        """A pipeline entry of the client's state (e.g. its error-feedback residual), or None."""
        return self._load(client_id).get(key)

    def put_private(self, client_id: int, key: str, value: Tensor) -> None:
        self._store(client_id, {**self._load(client_id), key: value.detach().clone()})

    def __len__(self) -> int:
        return len(set(self._mem) | set(self._where))

    def ids(self) -> list[int]:
        """The clients with a stored state, in id order."""
        return sorted(set(self._mem) | set(self._where))

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._mem or client_id in self._where

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    # ------------------------------------------------------------------ memory and eviction
    def _load(self, cid: int) -> dict:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid not in self._where:
            return {}
        state = self._read(self._where[cid], cid)
        self._mem[cid] = state
        self._mem_bytes += _nbytes(state)
        self._enforce_cap(keep=cid)
        return state

    def _store(self, cid: int, state: dict) -> None:
        self._mem_bytes -= _nbytes(self._mem.pop(cid, {}))
        self._mem[cid] = state
        self._mem_bytes += _nbytes(state)
        self._dirty.add(cid)
        self._enforce_cap(keep=cid)

    def _enforce_cap(self, keep: int) -> None:
        """Past the cap, evict least recently used states down to 3/4 of it (in one batch,
        so that spills are few and large); dirty ones are written as one segment first."""
        if self.memory_cap is None or self._mem_bytes <= self.memory_cap:
            return
        out: dict[int, dict] = {}
        for cid in list(self._mem):
            if self._mem_bytes <= 0.75 * self.memory_cap:
                break
            if cid == keep:
                continue
            state = self._mem.pop(cid)
            self._mem_bytes -= _nbytes(state)
            if cid in self._dirty:
                out[cid] = state
        if out:
            self._write_segment(out)
            self._dirty -= set(out)
            self.spilled_segments += 1

    # ------------------------------------------------------------------ segments on disk
    def _write_segment(self, states: dict[int, dict]) -> str:
        name = f"segment-{next(self._next):08d}.safetensors"
        path = self.folder / name
        flat = {k: v.contiguous() for k, v in tree.nested_flatten({str(c): s for c, s in states.items()}).items()}
        tmp = path.with_suffix(".tmp")
        save_file(flat, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for cid in states:
            old = self._where.get(cid)
            if old is not None:
                self._segments[old]["clients"].discard(cid)
            self._where[cid] = name
        self._segments[name] = {"sha256": _sha256(path), "clients": set(states), "size": len(states)}
        self._verified.add(name)
        return name

    def _read(self, name: str, cid: int) -> dict:
        path = self.folder / name
        if name not in self._verified:
            if path.is_symlink() or not path.is_file():
                raise ClientStoreError(f"client state segment {path} is missing")
            if _sha256(path) != self._segments[name]["sha256"]:
                raise ClientStoreError(f"client state segment {path} does not match its checksum: corrupt or modified")
            self._verified.add(name)
        prefix = f"{cid}/"
        try:
            with safe_open(str(path), framework="pt") as f:
                flat = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except (SafetensorError, OSError) as e:
            raise ClientStoreError(f"client state segment {path} is unreadable: {e}") from None
        if not flat:
            raise ClientStoreError(f"client state segment {path} does not hold client {cid}")
        return tree.nested_unflatten(flat)

    # ------------------------------------------------------------------ checkpoints
    def commit(self) -> list[dict]:
        """Write every dirty state (one segment), compact mostly-stale segments, and return
        the manifest: the live segments, oldest first (``[{"file", "sha256"}]``). The caller
        commits it atomically, then calls :meth:`collect` to delete what it no longer lists."""
        if self.folder is None:
            raise ValueError("a memory-only client store has no segments: checkpoint it with to_tensors()")
        if self._dirty:
            self._write_segment({c: self._mem[c] for c in sorted(self._dirty)})
            self._dirty.clear()
        stale = [n for n, s in self._segments.items() if len(s["clients"]) < COMPACT_BELOW * s["size"]]
        moving = sorted(c for n in stale for c in self._segments[n]["clients"])
        if moving:  # their newest copies, gathered into one segment; the stale ones then hold nobody
            self._write_segment({c: self._peek(c) for c in moving})
        for name in [n for n, s in self._segments.items() if not s["clients"]]:
            del self._segments[name]
        return self.manifest()

    def _peek(self, cid: int) -> dict:
        """A stored client's newest state, without touching the memory order or the cap."""
        return self._mem[cid] if cid in self._mem else self._read(self._where[cid], cid)

    def manifest(self) -> list[dict]:
        order = sorted(self._segments, key=lambda n: int(SEGMENT.fullmatch(n).group(1)))
        return [{"file": n, "sha256": self._segments[n]["sha256"]} for n in order]

    def collect(self) -> None:
        """Delete the segment files the current manifest does not list (superseded ones, and
        leftovers of a run killed between commits)."""
        live = set(self._segments)
        for path in self.folder.iterdir():
            if (SEGMENT.fullmatch(path.name) and path.name not in live) or path.suffix == ".tmp":
                path.unlink(missing_ok=True)

    @classmethod
    def open(cls, folder: Path, manifest: list, memory_cap: int | None = None) -> "ClientStore":
        """The store a committed manifest describes. Which clients a segment holds is read
        from its header (checked against the SHA-256 when its tensors are first read); files
        the manifest does not list are deleted."""
        store = cls(folder, memory_cap)
        if not isinstance(manifest, list):
            raise ClientStoreError("the client manifest must be a list of segments")
        top = -1
        for entry in manifest:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not SEGMENT.fullmatch(entry["file"]) or not isinstance(entry.get("sha256"), str):
                raise ClientStoreError(f"malformed client manifest entry {entry!r}")
            name, path = entry["file"], store.folder / entry["file"]
            if path.is_symlink() or not path.is_file():
                raise ClientStoreError(f"client state segment {path} is missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    holders = {int(k.partition("/")[0]) for k in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise ClientStoreError(f"client state segment {path} is unreadable: {e}") from None
            store._segments[name] = {"sha256": entry["sha256"], "clients": set(), "size": len(holders)}
            for cid in holders:  # later segments hold newer copies
                old = store._where.get(cid)
                if old is not None:
                    store._segments[old]["clients"].discard(cid)
                store._where[cid] = name
                store._segments[name]["clients"].add(cid)
            top = max(top, int(SEGMENT.fullmatch(name).group(1)))
        store._next = itertools.count(top + 1)
        store.collect()
        return store

    # ------------------------------------------------------------------ whole-store views
    def to_tensors(self) -> dict[str, Tensor]:
        """Every client's state as flat tensors ``<client id>/<path>`` (reads spilled ones)."""
        return tree.nested_flatten({str(c): self._peek(c) for c in self.ids()})

    def moved_to(self, folder: Path, memory_cap: int | None = None) -> "ClientStore":
        """This store's states in a store on ``folder`` (all of them to be written at the next
        commit): how a memory-only store, e.g. from an older checkpoint, joins a run folder."""
        store = ClientStore(folder, memory_cap)
        for cid, state in sorted(tree.nested_unflatten(self.to_tensors()).items(), key=lambda kv: int(kv[0])):
            store._store(int(cid), state)
        return store

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> "ClientStore":
        store = cls()
        for cid, state in tree.nested_unflatten(flat).items():
            store._mem[int(cid)] = state
            store._mem_bytes += _nbytes(state)
        return store


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
