"""Where client work runs. ``loop`` is the reference; ``vectorized`` must agree with it."""
from metafed.backends.base import Backend, ClientTask
from metafed.backends.loop import LoopBackend
from metafed.backends.vectorized import VectorizedBackend

BACKENDS = ("loop", "vectorized")


def make_backend(name: str, chunk_size: int = 128, compile: bool = False) -> Backend:
    if name == "loop":
        return LoopBackend()
    if name == "vectorized":
        return VectorizedBackend(chunk_size=chunk_size, compile=compile)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "ClientTask", "LoopBackend", "VectorizedBackend", "make_backend", "BACKENDS"]
