"""The run folder on disk: never overwritten silently, never written through a symlink,
and every path read from it stays inside it (DESIGN, "Wire and storage")."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MARKERS = ("config.yaml", "checkpoint.json", "metrics.jsonl")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why."""


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in MARKERS)


def check_target(path: Path, overwrite: bool) -> None:
    """Validate ``--out`` before anything is written (nothing on disk changes here)."""
    if path.is_symlink():
        raise RunFolderError(f"--out {path} is a symbolic link: metafed does not write through links")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        what = "an existing run" if is_run_folder(path) else "a folder that is not empty"
        raise RunFolderError(f"--out {path} is {what}: pass --overwrite to replace it, or --resume {path} to continue it")


def create(path: Path, overwrite: bool) -> None:
    """Make the run folder (after every check has passed); with ``overwrite`` empty it first."""
    check_target(path, overwrite)
    if path.is_dir() and overwrite:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def open_nofollow(path: Path, mode: str):
    """Open a file inside a run folder for writing ('w' or 'a') without following a symlink
    planted at that name."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise RunFolderError(f"cannot write {path}: {e.strerror} (a symbolic link there is refused)") from None
    if "b" in mode:
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, newline="" if path.suffix == ".csv" else None)


def write_text_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file via a temporary name and an atomic rename (a link at ``path`` is
    replaced, never followed)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()
    with open_nofollow(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def inside(run_dir: Path, name: str) -> Path:
    """``run_dir / name`` if ``name`` is a plain file name (no separators, no '..')."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or \
            os.path.basename(name) != name:
        raise RunFolderError(f"refusing the path {name!r} read from {run_dir}: not a plain file name inside it")
    return run_dir / name


@contextmanager
def exclusive(path: Path):
    """Hold the run folder for this process (an advisory ``flock`` on ``path/.lock``,
    released when the process exits, however it exits). A second writer, for example a
    resume started while an orphaned ServerApp still runs, is refused instead of
    interleaving rows and checkpoints with the first."""
    import fcntl

    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"{path} is in use by another metafed process (a run or resume still writing it): "
                             "stop that process first") from None
    try:
        yield
    finally:
        os.close(fd)
