"""--device: the backend is the device boundary. On this CPU-only machine the CUDA tests are
skipped; the CPU path runs the same code (every backend moves its inputs to its device and
returns CPU outputs)."""
from __future__ import annotations

import pytest
import torch

from metafed.backends.device import resolve_device
from metafed.config import ConfigError, build_config
from metafed.run import run
from tests.conftest import small_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_names_resolve_and_a_missing_gpu_is_a_clear_error():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is visible"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        build_config(device="tpu")


@pytest.mark.parametrize("backend", ["loop", "vectorized"])
def test_explicit_cpu_is_the_default_path_bit_for_bit(backend):
    """On a machine without CUDA, auto is the CPU: the same numbers, and outputs on the CPU."""
    a = run(small_config(backend=backend, device="cpu", algorithm="ditto", ditto_lambda=0.5))
    b = run(small_config(backend=backend, device="auto", algorithm="ditto", ditto_lambda=0.5))
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here: compared by the CUDA tests")
    for k, v in a.params.items():
        assert torch.equal(v, b.params[k]) and v.device.type == "cpu"


@cuda
@pytest.mark.parametrize("backend", ["loop", "vectorized"])
@pytest.mark.parametrize("overrides", [dict(algorithm="fedavg"), dict(algorithm="ditto", ditto_lambda=0.5),
                                       dict(algorithm="maml", local_steps=3),
                                       dict(algorithm="fedavg", local_optimizer="adam")])
def test_cuda_equals_cpu_within_tolerance(backend, overrides):
    """Same seed, same schedules (NumPy streams): the CUDA run follows the CPU run within
    float tolerance, global and personalized metrics included."""
    cpu = run(small_config(backend=backend, device="cpu", **overrides))
    gpu = run(small_config(backend=backend, device="cuda", **overrides))
    for k, v in cpu.params.items():
        assert gpu.params[k].device.type == "cpu"  # outputs come back to the CPU
        torch.testing.assert_close(gpu.params[k], v, atol=1e-4, rtol=1e-4)
    for key in ("global_accuracy", "personalized_accuracy"):
        assert gpu.rows[-1][key] == pytest.approx(cpu.rows[-1][key], abs=0.02)
