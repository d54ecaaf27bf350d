"""Readers for local dataset files. Nothing here downloads: files are read from disk, or
(for ``digits``) from the copy that scikit-learn ships inside its wheel."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

# LEAF Shakespeare's character set (Caldas et al. 2018): 80 symbols, index = class id.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


class DataNotFound(FileNotFoundError):
    """A local dataset file or folder is missing."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1,797 samples), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (MNIST format), gzipped or raw."""
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise DataNotFound(f"MNIST file {stem}[.gz] not found in {directory}")


def load_mnist(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST images (train then t10k) as float32 [n, 784] in [0, 1], labels int64."""
    if not directory.is_dir():
        raise DataNotFound(f"MNIST directory {directory} does not exist")
    xs, ys = [], []
    for split in ("train", "t10k"):
        x = read_idx(_find(directory, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise ValueError(f"MNIST {split}: {len(x)} images but {len(y)} labels")
        xs.append(x.reshape(len(x), -1).astype(np.float32) / 255.0)
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _read_leaf_dir(directory: Path) -> dict[str, dict]:
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise DataNotFound(f"no LEAF .json or .json.gz files in {directory}")
    users: dict[str, dict] = {}
    for p in files:
        with _open(p) as f:
            try:
                blob = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as e:
                raise ValueError(f"{p} is not valid LEAF JSON: {e}") from None
        if "user_data" not in blob:
            raise ValueError(f"{p} has no 'user_data' key: not a LEAF file")
        users.update(blob["user_data"])
    return users


def find_leaf_root(base: Path) -> Path:
    """The first folder at or below ``base`` that holds ``train/`` and ``test/``."""
    if not base.exists():
        raise DataNotFound(f"LEAF data folder {base} does not exist")
    for candidate in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise DataNotFound(f"no folder with train/ and test/ LEAF splits under {base}")


def encode_text(samples: list) -> np.ndarray:
    """LEAF Shakespeare strings -> int64 character ids (unknown characters map to 0)."""
    lookup = {ch: i for i, ch in enumerate(LEAF_LETTERS)}
    return np.array([[lookup.get(ch, 0) for ch in s] for s in samples], dtype=np.int64)


def load_leaf(base: Path, text: bool) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Users present in both LEAF splits: (name, train_x, train_y, test_x, test_y)."""
    root = find_leaf_root(base)
    train, test = _read_leaf_dir(root / "train"), _read_leaf_dir(root / "test")
    out = []
    for name in sorted(set(train) & set(test)):
        parts = []
        for split in (train[name], test[name]):
            if text:
                x, y = encode_text(split["x"]), encode_text(split["y"])[:, 0]
            else:
                x, y = np.asarray(split["x"], dtype=np.float32), np.asarray(split["y"], dtype=np.int64)
            parts += [x, y]
        out.append((name, *parts))
    if not out:
        raise DataNotFound(f"no user appears in both LEAF splits under {root}")
    return out
