"""Every corrupt or wrong input is one line on stderr with exit code 2, never a traceback,
and leaves every file on disk as it was (issue: security hardening, findings 20-25)."""
import gzip
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from metafed.cli import main
from metafed.run import run
from tests.conftest import small_config

TINY = ["--rounds", "1", "--num-clients", "4", "--clients-per-round", "2", "--local-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run(small_config(rounds=2, num_clients=4, clients_per_round=2, local_steps=1, out=out))
    return out


# ---------------------------------------------------------------------------- builders
def idx(dims, payload: bytes | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    n = int(np.prod(dims))
    return header + (payload if payload is not None else bytes(np.random.default_rng(0).integers(0, 10, n, dtype=np.uint8)))


def mnist_dir(root: Path, labels: bytes | None = None, images: bytes | None = None, raw: dict | None = None) -> Path:
    d = root / "mnist"
    d.mkdir(parents=True)
    files = {"train-images-idx3-ubyte.gz": gzip.compress(images or idx((40, 28, 28))),
             "train-labels-idx1-ubyte.gz": gzip.compress(labels or idx((40,))),
             "t10k-images-idx3-ubyte.gz": gzip.compress(idx((10, 28, 28))),
             "t10k-labels-idx1-ubyte.gz": gzip.compress(idx((10,)))}
    files.update(raw or {})
    for name, blob in files.items():
        (d / name).write_bytes(blob)
    return root


def leaf_dir(root: Path, name: str, train_blob, test_blob=None) -> Path:
    for split, blob in (("train", train_blob), ("test", test_blob if test_blob is not None else train_blob)):
        (root / name / split).mkdir(parents=True, exist_ok=True)
        text = blob if isinstance(blob, str) else json.dumps(blob)
        (root / name / split / "a.json").write_text(text)
    return root


def femnist_user(x, y):
    return {"users": ["u"], "num_samples": [len(y)], "user_data": {"u": {"x": x, "y": y}}}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_pointer(run_dir: Path, **changes) -> None:
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        meta.pop(k)
    (run_dir / "checkpoint.json").write_text(json.dumps(meta))


def rewrite_tensors(run_dir: Path, change) -> None:
    """Rewrite the checkpoint's tensors and fix its checksum: only the content is wrong."""
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    path = run_dir / meta["file"]
    blob = save_bytes(change(dict(load_bytes(path.read_bytes()))))
    path.write_bytes(blob)
    edit_pointer(run_dir, sha256=hashlib.sha256(blob).hexdigest())


def bomb(root: Path) -> Path:
    zeros = gzip.compress(bytes(129 * 2 ** 20), compresslevel=1)
    return mnist_dir(root, raw={"train-images-idx3-ubyte.gz": zeros})


# ---------------------------------------------------------------------------- the table
# each case: (id, callable(tmp, finished_run) -> argv)
def out(t):
    return ["--out", str(t / "new")]


FLAG_CASES = [
    ("rounds-word", lambda t, r: ["run", "--rounds", "abc", *out(t)]),
    ("rounds-negative", lambda t, r: ["run", "--rounds", "-1", *out(t)]),
    ("lr-inf", lambda t, r: ["run", "--lr", "inf", *out(t)]),
    ("lr-nan", lambda t, r: ["run", "--lr", "nan", *out(t)]),
    ("lr-negative", lambda t, r: ["run", "--lr", "-0.1", *out(t)]),
    ("unknown-algorithm", lambda t, r: ["run", "--algorithm", "nope", *out(t)]),
    ("unknown-dataset", lambda t, r: ["run", "--dataset", "nope", *out(t)]),
    ("unknown-model", lambda t, r: ["run", "--model", "nope", *out(t)]),
    ("unknown-partition", lambda t, r: ["run", "--partition", "nope", *out(t)]),
    ("unknown-aggregator", lambda t, r: ["run", "--aggregator", "nope", *out(t)]),
    ("unknown-flag", lambda t, r: ["run", "--bogus-flag", "1", *out(t)]),
    ("unknown-command", lambda t, r: ["fly"]),
    ("set-unknown-key", lambda t, r: ["run", "--set", "nope=1", *out(t)]),
    ("set-no-equals", lambda t, r: ["run", "--set", "rounds", *out(t)]),
    ("set-bad-yaml", lambda t, r: ["run", "--set", "hidden=[1,2", *out(t)]),
    ("negative-hidden", lambda t, r: ["run", "--set", "hidden=[-3]", *out(t)]),
    ("dp-without-noise", lambda t, r: ["run", "--dp", "central", *out(t)]),
    ("local-adaptive-clip", lambda t, r: ["run", "--dp", "local", "--dp-noise-multiplier", "1", "--dp-adaptive-clip", *out(t)]),
    ("krum-without-f", lambda t, r: ["run", "--aggregator", "krum", *out(t)]),
    ("secagg-threshold-half", lambda t, r: ["run", "--secure-aggregation", "--secagg-threshold", "5", *out(t)]),
    ("secagg-odd-k", lambda t, r: ["run", "--secure-aggregation", "--secagg-neighbours", "3", *TINY, *out(t)]),
    ("secagg-median", lambda t, r: ["run", "--secure-aggregation", "--aggregator", "median", *out(t)]),
    ("ignored-count-noise", lambda t, r: ["run", "--set", "dp_count_noise=2", *out(t)]),
    ("attack-without-fraction", lambda t, r: ["run", "--attack", "sign-flip", *out(t)]),
    ("zero-clients-per-round", lambda t, r: ["run", "--clients-per-round", "0", *out(t)]),
    ("zero-alpha", lambda t, r: ["run", "--dirichlet-alpha", "0", *out(t)]),
    ("secagg-range-inf", lambda t, r: ["run", "--secure-aggregation", "--set", "secagg_range=.inf", *out(t)]),
    ("text-dataset-mlp", lambda t, r: ["run", "--dataset", "shakespeare", "--model", "mlp", *out(t)]),
    ("no-out", lambda t, r: ["run", "--rounds", "1"]),
    ("resume-and-overwrite", lambda t, r: ["run", "--resume", str(r), "--overwrite"]),
    ("negative-target-epsilon", lambda t, r: ["run", "--dp", "central", "--target-epsilon", "-1", *out(t)]),
]


def _write(t: Path, name: str, data) -> Path:
    p = t / name
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


CONFIG_CASES = [
    ("config-folder", lambda t, r: ["run", "--config", str(t), *out(t)]),
    ("config-missing", lambda t, r: ["run", "--config", str(t / "none.yaml"), *out(t)]),
    ("config-bad-yaml", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", "rounds: [1,\n")), *out(t)]),
    ("config-list", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", "- 1\n- 2\n")), *out(t)]),
    ("config-unknown-key", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", "roundz: 3\n")), *out(t)]),
    ("config-binary", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", bytes(range(256)) * 4)), *out(t)]),
    ("config-inf", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", "lr: .inf\n")), *out(t)]),
    ("config-nested", lambda t, r: ["run", "--config", str(_write(t, "c.yaml", "hidden: " + "[" * 5000 + "]" * 5000)), *out(t)]),
]


def _symlinked(t: Path) -> Path:
    (t / "real").mkdir()
    os.symlink(t / "real", t / "link")
    return t / "link"


FOLDER_CASES = [
    ("out-existing-run", lambda t, r: ["run", *TINY, "--out", str(copy_run(r, t / "old"))]),
    ("out-is-file", lambda t, r: ["run", *TINY, "--out", str(_write(t, "afile", "x"))]),
    ("out-symlink", lambda t, r: ["run", *TINY, "--out", str(_symlinked(t))]),
    ("out-nonempty-folder", lambda t, r: ["run", *TINY, "--out", str(_write(t, "keep.txt", "x").parent)]),
    ("overwrite-then-invalid-model", lambda t, r: ["run", "--dataset", "synthetic", "--model", "cnn", "--overwrite",
                                                   "--out", str(copy_run(r, t / "old"))]),
    ("overwrite-then-fltrust-without-root", lambda t, r: ["run", "--dataset", "synthetic", "--aggregator", "fltrust",
                                                          "--overwrite", "--out", str(copy_run(r, t / "old"))]),
]


def _resume(t, r, prepare, *extra):
    d = copy_run(r, t / "old")
    prepare(d)
    return ["run", "--resume", str(d), "--no-progress", *extra]


RESUME_CASES = [
    ("resume-no-config", lambda t, r: _resume(t, r, lambda d: (d / "config.yaml").unlink())),
    ("resume-not-a-folder", lambda t, r: ["run", "--resume", str(_write(t, "f", "x"))]),
    ("pointer-missing", lambda t, r: _resume(t, r, lambda d: (d / "checkpoint.json").unlink())),
    ("pointer-corrupt", lambda t, r: _resume(t, r, lambda d: (d / "checkpoint.json").write_text("{oops"))),
    ("pointer-list", lambda t, r: _resume(t, r, lambda d: (d / "checkpoint.json").write_text("[1, 2]"))),
    ("pointer-path-escape", lambda t, r: _resume(t, r, lambda d: edit_pointer(d, file="../../victim.safetensors"))),
    ("pointer-round-string", lambda t, r: _resume(t, r, lambda d: edit_pointer(d, round="2"))),
    ("pointer-no-round", lambda t, r: _resume(t, r, lambda d: edit_pointer(d, round=None))),
    ("pointer-no-checksum", lambda t, r: _resume(t, r, lambda d: edit_pointer(d, sha256=None))),
    ("tensor-bit-flip", lambda t, r: _resume(t, r, lambda d: _flip(d / "checkpoint-2.safetensors", 200))),
    ("tensor-truncated", lambda t, r: _resume(t, r, lambda d: _truncate(d / "checkpoint-2.safetensors"))),
    ("tensor-unexpected-name", lambda t, r: _resume(t, r, lambda d: rewrite_tensors(
        d, lambda f: {**f, "mystery/x": torch.zeros(1)}))),
    ("tensor-wrong-shape", lambda t, r: _resume(t, r, lambda d: rewrite_tensors(
        d, lambda f: {k: (v[:1] if k.startswith("params/") else v) for k, v in f.items()}))),
    ("tensor-missing-param", lambda t, r: _resume(t, r, lambda d: rewrite_tensors(
        d, lambda f: {k: v for k, v in f.items() if k != sorted(f)[-1]}))),
    ("resume-changed-lr", lambda t, r: _resume(t, r, lambda d: None, "--lr", "0.5")),
    ("resume-changed-algorithm", lambda t, r: _resume(t, r, lambda d: None, "--algorithm", "fedprox", "--mu", "0.1")),
    ("resume-fewer-rounds", lambda t, r: _resume(t, r, lambda d: None, "--rounds", "1")),
    ("resume-config-corrupt", lambda t, r: _resume(t, r, lambda d: (d / "config.yaml").write_text("lr: [\n"))),
]


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


def _mnist(t, **kw):
    return ["run", "--dataset", "mnist", "--data-dir", str(mnist_dir(t / "data", **kw)), *TINY, *out(t)]


def _leaf(t, name, blob, test=None):
    return ["run", "--dataset", name, "--data-dir", str(leaf_dir(t / "data", name, blob, test)), *TINY, *out(t)]


GOOD_X = [[0.0] * 784] * 2
DATA_CASES = [
    ("gz-truncated", lambda t, r: _mnist(t, raw={"train-labels-idx1-ubyte.gz": gzip.compress(idx((40,)))[:15]})),
    ("gz-random", lambda t, r: _mnist(t, raw={"train-labels-idx1-ubyte.gz": bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))})),
    ("gz-bit-flip", lambda t, r: _mnist(t, raw={"train-labels-idx1-ubyte.gz": _flipped(gzip.compress(idx((40,))), 25)})),
    ("gz-bomb", lambda t, r: ["run", "--dataset", "mnist", "--data-dir", str(bomb(t / "data")), *TINY, *out(t)]),
    ("idx-labels-out-of-range", lambda t, r: _mnist(t, labels=idx((40,), bytes([200] * 40)))),
    ("idx-lying-header", lambda t, r: _mnist(t, labels=idx((40,), bytes(10)))),
    ("idx-wrong-ndim", lambda t, r: _mnist(t, labels=idx((40, 1)))),
    ("idx-count-mismatch", lambda t, r: _mnist(t, labels=idx((39,)))),
    ("leaf-list", lambda t, r: _leaf(t, "femnist", [1, 2, 3])),
    ("leaf-user-data-list", lambda t, r: _leaf(t, "femnist", {"user_data": []})),
    ("leaf-missing-x", lambda t, r: _leaf(t, "femnist", {"user_data": {"u": {"y": [1]}}})),
    ("leaf-wrong-width", lambda t, r: _leaf(t, "femnist", femnist_user([[0.0] * 10] * 2, [1, 2]))),
    ("leaf-label-range", lambda t, r: _leaf(t, "femnist", femnist_user(GOOD_X, [1, 99]))),
    ("leaf-label-float", lambda t, r: _leaf(t, "femnist", femnist_user(GOOD_X, [1.5, 2.0]))),
    ("leaf-x-text", lambda t, r: _leaf(t, "femnist", femnist_user(["ab", "cd"], [1, 2]))),
    ("leaf-length-mismatch", lambda t, r: _leaf(t, "femnist", femnist_user(GOOD_X, [1]))),
    ("leaf-not-json", lambda t, r: _leaf(t, "femnist", "{nope")),
    ("leaf-deep-nesting", lambda t, r: _leaf(t, "femnist", "[" * 100000 + "]" * 100000)),
    ("shakespeare-empty-strings", lambda t, r: _leaf(t, "shakespeare", {"user_data": {"u": {"x": [""], "y": [""]}}})),
    ("shakespeare-numbers", lambda t, r: _leaf(t, "shakespeare", {"user_data": {"u": {"x": [12], "y": [3]}}})),
    ("shakespeare-long-label", lambda t, r: _leaf(t, "shakespeare", {"user_data": {"u": {"x": ["a" * 80], "y": ["ab"]}}})),
]


def _flipped(blob: bytes, pos: int) -> bytes:
    data = bytearray(blob)
    data[pos] ^= 0x01
    return bytes(data)


CASES = FLAG_CASES + CONFIG_CASES + FOLDER_CASES + RESUME_CASES + DATA_CASES


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("make_argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(make_argv, tmp_path, finished_run, capsys):
    argv = make_argv(tmp_path, finished_run)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
