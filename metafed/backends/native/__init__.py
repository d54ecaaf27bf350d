"""The native local-training kernel (``sgd_mlp.c``): many clients' plain-SGD ReLU-MLP steps,
one client at a time in cache, on CPU threads. See the C file for why and how.

It is built at first use with the system C compiler (``$CC`` or ``cc``) into a cache folder
(``$METAFED_NATIVE_CACHE``, default ``~/.cache/metafed/native``), named by a hash of the
source, the flags, the compiler and the CPU, so a shared home across machines never loads a
library built for another CPU. Without a compiler, or with ``METAFED_NATIVE=0``, the
vectorized backend falls back to its torch paths (the fused step of
:mod:`metafed.backends.fused_mlp` where it applies, else the generic step), which compute the
same maths; the choice is logged once.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sgd_mlp.c")
# -fno-math-errno: expf/logf inline; no -ffast-math: NaN and inf must propagate as in torch
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread"]
_UNSET = object()
_library = _UNSET


def _cpu_fingerprint() -> str:
    try:  # x86 "flags" / ARM "Features": what -march=native compiled for
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> Path | None:
    """Build the library into ``out``'s folder, trying -march=native first."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    identity = [SOURCE.read_text(), version, _cpu_fingerprint()]
    for arch in (["-march=native"], []):
        flags = BASE_FLAGS + arch
        key = hashlib.sha256("\0".join([*identity, *flags]).encode())
        target = out / f"sgd_mlp-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # build aside, then an atomic rename:
            built = Path(tmp) / "lib.so"                   # concurrent processes never see half a file
            result = subprocess.run([cc, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode == 0:
                os.replace(built, target)
                return target
            log.debug("native kernel: %s %s failed: %s", cc, " ".join(flags), result.stderr[-2000:])
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (disabled, no compiler, or the build failed); built once per
    process and cached on disk across processes."""
    global _library
    if _library is not _UNSET:
        return _library
    _library = None
    if os.environ.get("METAFED_NATIVE", "1") == "0":
        log.info("native kernel disabled by METAFED_NATIVE=0: the torch paths run instead")
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.warning("no C compiler found ($CC or cc): MLP programs run the slower torch paths")
        return None
    cache = Path(os.environ.get("METAFED_NATIVE_CACHE", Path.home() / ".cache" / "metafed" / "native"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        path = _compile(cc, cache)
        if path is None:
            log.warning("the native kernel did not build with %s: the torch paths run instead", cc)
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("native kernel unavailable (%s): the torch paths run instead", err)
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.mf_sgd_mlp_train.argtypes = [i64, i64, i64, p, p, p, p, p, p, p, p, p, i64, p, i64, i64, p, f32, f32, i64,
                                     f32, p, p, i64]
    lib.mf_sgd_mlp_train.restype = ctypes.c_int
    _library = lib
    return lib


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


KIND_SGD, KIND_META, KIND_MOREAU, KIND_MOREAU_SOLVE = 0, 1, 2, 3  # sgd_mlp.c's client_step


def _check_layers(layers: list[tuple[Tensor, Tensor]], c: int, d: int) -> list[int]:
    dims = [d] + [w.shape[1] for w, _ in layers]
    for (w, b), (fan_in, fan_out) in zip(layers, zip(dims[:-1], dims[1:])):
        if w.shape != (c, fan_out, fan_in) or b.shape != (c, fan_out) or not (w.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"layer shapes {tuple(w.shape)}, {tuple(b.shape)} do not chain from input dim {d}")
    return dims


def _run(kind: int, layers, x: Tensor, y: Tensor, idx: Tensor, steps: Tensor, lr: float, pull: float,
         anchor, inner_steps: int, outer_lr: float, personal, threads: int | None) -> tuple[Tensor, Tensor]:
    """Checks every index the kernel will follow, then one kernel call: (losses [C], flags [C])."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernel is unavailable")
    c, n_max, d = x.shape
    dims = _check_layers(layers, c, d)
    if personal is not None and _check_layers(personal, c, d) != dims:
        raise ValueError("the personal models must have the layers' shapes")
    if idx.dim() != (4 if kind == KIND_META else 3) or (kind == KIND_META and idx.shape[2] != 2):
        raise ValueError("a meta step takes idx [C, S, 2, B] (support, query); the other steps [C, S, B]")
    if idx.shape[0] != c or steps.shape != (c,) or y.shape != (c, n_max) or (c and int(steps.max()) > idx.shape[1]):
        raise ValueError("schedule, step counts and labels must cover the same clients")
    # the kernel indexes memory with these: check them here instead of reading out of bounds
    if idx.numel() and (int(idx.max()) >= n_max or int(idx.min()) < -1):
        raise ValueError("a batch index lies outside the client's data")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= dims[-1]):
        raise ValueError(f"labels must lie in [0, {dims[-1]})")
    x, y, idx, steps = (t.contiguous() for t in (x, y, idx, steps))
    dims_t = torch.tensor(dims, dtype=torch.int64)
    loss, flag = torch.zeros(c, dtype=torch.float32), torch.zeros(c, dtype=torch.float32)
    aw = ab = pw = pb = None
    if anchor is not None:  # kept alive until the call returns
        anchor_w = [a.detach().contiguous() for a, _ in anchor]
        anchor_b = [a.detach().contiguous() for _, a in anchor]
        aw, ab = _pointers(anchor_w), _pointers(anchor_b)
    if personal is not None:
        pw, pb = _pointers([w for w, _ in personal]), _pointers([b for _, b in personal])
    status = lib.mf_sgd_mlp_train(kind, c, len(layers), dims_t.data_ptr(), _pointers([w for w, _ in layers]),
                                  _pointers([b for _, b in layers]), pw, pb, aw, ab, x.data_ptr(), y.data_ptr(), n_max,
                                  idx.data_ptr(), idx.shape[1], idx.shape[-1], steps.data_ptr(), lr, pull,
                                  inner_steps, outer_lr, loss.data_ptr(), flag.data_ptr(),
                                  threads or torch.get_num_threads())
    if status != 0:
        raise RuntimeError("the native kernel ran out of memory")
    return loss, flag


def train_mlp_sgd(layers: list[tuple[Tensor, Tensor]], x: Tensor, y: Tensor, idx: Tensor, steps: Tensor, lr: float,
                  pull: float = 0.0, anchor: list[tuple[Tensor, Tensor]] | None = None,
                  threads: int | None = None, meta: tuple[int, float] | None = None) -> Tensor:
    """Run each client's local steps in place on ``layers`` and return its summed step losses.

    layers: per layer (weight [C, out, in], bias [C, out]), float32, contiguous, CPU; updated
    in place. x [C, n_max, D] float32; y [C, n_max] int64 labels in [0, classes); idx
    [C, S, B] int64 sample rows (-1: padding); steps [C] int64 active steps (<= S). With
    ``pull`` > 0, ``anchor`` holds the global (weight [out, in], bias [out]) pairs.
    ``meta`` = (inner_steps, outer_lr): first-order meta steps instead (FOMAML, Per-FedAvg
    FO; ``lr`` is then the inner lr), with idx [C, S, 2, B] (support, query).
    Returns [C] float32. Raises RuntimeError when the kernel is unavailable or out of memory.
    """
    if meta:
        if pull:
            raise ValueError("a meta step takes no proximal pull")
        return _run(KIND_META, layers, x, y, idx, steps, lr, 0.0, None, meta[0], meta[1], None, threads)[0]
    return _run(KIND_SGD, layers, x, y, idx, steps, lr, pull, anchor if pull else None, 0, 0.0, None, threads)[0]


def train_mlp_moreau(layers, personal, x: Tensor, y: Tensor, idx: Tensor, steps: Tensor, personal_lr: float, lam: float,
                     inner_steps: int, lr: float, threads: int | None = None) -> tuple[Tensor, Tensor]:
    """pFedMe's local steps (Dinh et al. 2020), in place on the local models ``layers`` (w) and
    the personal models ``personal`` (theta, the solve's warm start): per step, ``inner_steps``
    gradient steps at ``personal_lr`` on loss(theta) + lam/2 ||theta - w||^2, then
    w <- w - lr lam (w - theta). Shapes as :func:`train_mlp_sgd`. Returns (summed loss(theta)
    after each solve [C], 1.0 where a solve ever raised its own objective [C])."""
    return _run(KIND_MOREAU, layers, x, y, idx, steps, personal_lr, lam, None, inner_steps, lr, personal, threads)


def solve_mlp_moreau(layers, x: Tensor, y: Tensor, idx: Tensor, steps: Tensor, personal_lr: float, lam: float,
                     inner_steps: int, anchor: list[tuple[Tensor, Tensor]], threads: int | None = None) -> Tensor:
    """pFedMe's personalization: per step the Moreau solve on ``layers`` (in place) anchored at
    ``anchor`` (the global model). Returns the summed loss after each solve [C]."""
    return _run(KIND_MOREAU_SOLVE, layers, x, y, idx, steps, personal_lr, lam, anchor, inner_steps, 0.0, None,
                threads)[0]
