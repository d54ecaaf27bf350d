"""Readers for local dataset files. Nothing here downloads: files are read from disk, or
(for ``digits``) from the copy shipped in this package (``digits.npz``)."""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import numpy as np

# LEAF Shakespeare's character set (Caldas et al. 2018): 80 symbols, index = class id.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


# no dataset file metafed reads is near this when decompressed (MNIST's largest is 47 MB);
# a small .gz that inflates past it is refused instead of filling memory
MAX_FILE_BYTES = 128 * 2 ** 20


class DataNotFound(FileNotFoundError):
    """A local dataset file or folder is missing."""


class DataError(ValueError):
    """A dataset file exists but is corrupt, truncated, too large or of the wrong structure."""


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The (decompressed) bytes of a data file, refusing corrupt gzip and anything over ``limit``."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read(limit + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} cannot be read: {str(e) or type(e).__name__} (corrupt or truncated file?)") from None
    if len(raw) > limit:
        raise DataError(f"{path} decompresses to more than {limit // 2 ** 20} MiB: refused (not a dataset file?)")
    return raw


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 handwritten digits (1,797 samples, pixel values 0..16), scaled to [0, 1].

    Shipped with metafed as ``digits.npz`` (45 KB): the test set of the UCI "Optical
    Recognition of Handwritten Digits" data (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), in
    the copy scikit-learn distributes as ``load_digits``, byte for byte."""
    with np.load(DIGITS_FILE) as d:
        return (d["x"] / 16.0).astype(np.float32), d["y"].astype(np.int64)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file (MNIST format), gzipped or raw, that must have ``ndim`` dimensions."""
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    if raw[3] != ndim or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: header declares {raw[3]} dimensions, expected {ndim}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims, dtype=object)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values (truncated or lying header)")
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
        x = read_idx(_find(directory, f"{split}-images-idx3-ubyte"), 3)
        y = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"), 1)
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"MNIST {split}: {len(x)} images but {len(y)} labels")
        if y.max() > 9:
            raise DataError(f"MNIST {split} labels hold {int((y > 9).sum())} values outside 0..9")
        xs.append(x.reshape(len(x), -1).astype(np.float32) / 255.0)
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _read_leaf_dir(directory: Path) -> dict[str, dict]:
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise DataNotFound(f"no LEAF .json or .json.gz files in {directory}")
    users: dict[str, dict] = {}
    for p in files:
        try:
            blob = json.loads(read_bytes(p))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{p} is not valid LEAF JSON: {str(e).splitlines()[0]}") from None
        except RecursionError:
            raise DataError(f"{p} is nested too deeply to be LEAF JSON") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("user_data"), dict):
            raise DataError(f"{p} has no 'user_data' object: not a LEAF file")
        for name, data in blob["user_data"].items():
            if not isinstance(data, dict) or not isinstance(data.get("x"), list) or not isinstance(data.get("y"), list):
                raise DataError(f"{p}: user {name!r} needs lists 'x' and 'y'")
            if len(data["x"]) != len(data["y"]) or not data["y"]:
                raise DataError(f"{p}: user {name!r} has {len(data['x'])} inputs and {len(data['y'])} labels")
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


def encode_text(samples: list, length: int, what: str) -> np.ndarray:
    """LEAF Shakespeare strings of ``length`` characters -> int64 character ids (unknown
    characters map to 0)."""
    lookup = {ch: i for i, ch in enumerate(LEAF_LETTERS)}
    for s in samples:
        if not isinstance(s, str) or len(s) != length:
            raise DataError(f"{what}: expected strings of {length} character(s), got {str(s)[:40]!r}")
    return np.array([[lookup.get(ch, 0) for ch in s] for s in samples], dtype=np.int64).reshape(len(samples), length)


def _leaf_images(split: dict, width: int, classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(split["x"], dtype=np.float32)
        y = np.asarray(split["y"])
    except (ValueError, TypeError):
        raise DataError(f"{what}: 'x' must be rows of numbers and 'y' integer labels") from None
    if x.ndim != 2 or x.shape[1] != width or not np.isfinite(x).all():
        raise DataError(f"{what}: inputs must be finite rows of {width} numbers, got shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        raise DataError(f"{what}: labels must be integers in 0..{classes - 1}")
    return x, y.astype(np.int64)


def load_leaf(base: Path, text: bool) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Users present in both LEAF splits: (name, train_x, train_y, test_x, test_y).
    FEMNIST: rows of 784 pixels, labels 0..61; Shakespeare: 80-character strings and a
    one-character label. Anything else is a DataError naming the file's user."""
    root = find_leaf_root(base)
    train, test = _read_leaf_dir(root / "train"), _read_leaf_dir(root / "test")
    out = []
    for name in sorted(set(train) & set(test)):
        parts = []
        for split_name, split in (("train", train[name]), ("test", test[name])):
            what = f"LEAF {split_name} user {name!r}"
            if text:
                x, y = encode_text(split["x"], 80, what), encode_text(split["y"], 1, what)[:, 0]
            else:
                x, y = _leaf_images(split, 784, 62, what)
            parts += [x, y]
        out.append((name, *parts))
    if not out:
        raise DataNotFound(f"no user appears in both LEAF splits under {root}")
    return out


def standardize_features(x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Per-feature standardisation (x - mean) / std, the statistics taken over ``reference``
    (default: ``x``) as the pFedMe MNIST and LEAF pipelines do before partitioning. Constant
    features (MNIST's border pixels) become 0. A data-preparation step: the statistics come
    from the pooled data, which a real federation's server would not see."""
    ref = x if reference is None else reference
    mean, std = ref.mean(0), ref.std(0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
