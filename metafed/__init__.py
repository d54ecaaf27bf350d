"""metafed: federated and meta-federated (personalized) learning on PyTorch."""
from metafed.config import RunConfig

__version__ = "0.1.0"


def run(cfg: RunConfig, resume=None):
    """Run a federated job described by ``cfg`` (see :func:`metafed.run.run`)."""
    from metafed.run import run as _run

    return _run(cfg, resume)


__all__ = ["RunConfig", "run", "__version__"]
