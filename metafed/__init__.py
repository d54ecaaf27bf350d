"""metafed: federated and meta-federated (personalized) learning on PyTorch.

``metafed.run(cfg, resume=None, overwrite=False, pool=None, model=None, data=None)`` runs a
job (see :func:`metafed.run.run`). It is imported here, not wrapped lazily: the package's
``run`` attribute would otherwise be replaced by the ``metafed.run`` submodule as soon as
anything imported it, and ``from metafed import run`` would give a module."""
from metafed.config import RunConfig
from metafed.run import run
from metafed.version import __version__

__all__ = ["RunConfig", "run", "__version__"]
