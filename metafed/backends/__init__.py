"""Where client work runs. ``loop`` is the reference; ``vectorized`` and ``ray`` must agree with it."""
from metafed.backends.base import Backend, ClientTask
from metafed.backends.loop import LoopBackend
from metafed.backends.vectorized import VectorizedBackend

BACKENDS = ("loop", "vectorized", "ray")


def make_backend(name: str, chunk_size: int = 128, compile: bool = False, dataset=None,
                 ray_address: str | None = None, ray_workers: int | None = None, device: str = "cpu") -> Backend:
    """``dataset`` (a FederatedDataset): the training data the ``ray`` backend puts in the
    object store once, so that tasks name clients instead of carrying their data (for clients
    built on demand, :class:`~metafed.data.lazy.LazyClients`, only their recipe travels).
    ``device``: ``auto``, ``cpu`` or ``cuda`` (:mod:`metafed.backends.device`); a Ray worker
    resolves it on its own machine."""
    if name == "loop":
        return LoopBackend(device)
    if name == "vectorized":
        return VectorizedBackend(chunk_size=chunk_size, compile=compile, device=device)
    if name == "ray":
        from metafed.backends.ray_cluster import PackedClients, RayBackend

        if dataset is None:
            raise ValueError("the ray backend needs the federation's dataset")
        if hasattr(dataset.clients, "client"):  # clients built on demand: workers get the recipe, not the data
            source = dataset.clients
        else:
            source = PackedClients.of([c.train_x for c in dataset.clients], [c.train_y for c in dataset.clients])
        return RayBackend(source, chunk_size, compile, ray_address, ray_workers, device=device)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "ClientTask", "LoopBackend", "VectorizedBackend", "make_backend", "BACKENDS"]
