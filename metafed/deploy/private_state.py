"""Where a node keeps what it must not share: its partition cache (its data), personal
models, error-feedback residuals, replicas and receipts.

The default folder is per user and private (``$METAFED_NODE_STATE``, else
``$XDG_STATE_HOME/metafed/nodes``, else ``~/.local/state/metafed/nodes``), never a
predictable shared path like ``/tmp``. Folders metafed creates are 0700 and files 0600;
a state folder owned by another user, or writable by group or others, is refused (anyone
who can write there could plant the node's data or swap its models), and so is a
symbolic link in its place. Files are written through a temporary name opened with
``O_EXCL | O_NOFOLLOW`` and renamed into place."""
from __future__ import annotations

import os
import stat
from pathlib import Path


class StateFolderError(ValueError):
    """A node state folder that is not private to this user."""


def default_state_root() -> Path:
    """The per-user root of node state folders."""
    explicit = os.environ.get("METAFED_NODE_STATE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "metafed" / "nodes"


def _check(path: Path) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StateFolderError(f"node state folder {path} is not a plain folder (a symbolic link there is refused)")
    if info.st_uid != os.getuid():
        raise StateFolderError(f"node state folder {path} belongs to another user (uid {info.st_uid}): refused")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateFolderError(f"node state folder {path} is writable by group or others "
                               f"(mode {stat.S_IMODE(info.st_mode):o}): refused, make it 0700")


def private_folder(path: Path) -> Path:
    """``path``, created 0700 (parents too) if missing; refused unless private to this user."""
    path = Path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
    _check(path)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a whole file, mode 0600, in a private folder: a fresh temporary name opened with
    O_EXCL | O_NOFOLLOW (nothing planted there is followed or reused), then an atomic rename."""
    folder = private_folder(path.parent)
    tmp = folder / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_private(path: Path, line: str) -> None:
    """Append a line to a 0600 file in a private folder, never through a symbolic link."""
    private_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
