"""Which ClientApp a warm node runs: the node decides, not the app bundle the server sends.

Flower runs the ClientApp that a run's app bundle (FAB) names, from the code in that
bundle: whoever submits a run chooses the code every SuperNode executes on its data, so a
node's own policy (:mod:`metafed.deploy.policy`) would hold only as long as the server
ships metafed's ClientApp. ``metafed node`` closes that door: it serves only the ClientApps
its operator allows (metafed's own by default, ``--client-app module:attribute`` for a
party's own app built with :func:`metafed.deploy.flower_apps`), imports them from the
node's own installed packages, and never installs or imports the bundle's code. A bundle
naming any other ClientApp is refused with its name."""
from __future__ import annotations

import functools
import importlib
import io
import tomllib
import zipfile

METAFED_CLIENT_APP = "metafed.deploy.client_app:app"


class ClientAppRefused(RuntimeError):
    """The run's app bundle names a ClientApp this node does not serve."""


def bundle_client_app(fab_content: bytes) -> str:
    """The ClientApp reference (``module:attribute``) an app bundle's pyproject names."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as bundle:
            pyproject = tomllib.loads(bundle.read("pyproject.toml").decode())
        return str(pyproject["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ClientAppRefused(f"the run's app bundle names no ClientApp ({e})") from None


@functools.lru_cache(maxsize=8)
def import_client_app(reference: str):
    """``module:attribute`` imported from this node's installed packages."""
    from flwr.clientapp import ClientApp

    module, _, attribute = reference.partition(":")
    app = getattr(importlib.import_module(module), attribute or "app")
    if not isinstance(app, ClientApp):
        raise ClientAppRefused(f"{reference} is not a Flower ClientApp")
    return app


def served_client_app(fab_content: bytes, allowed: tuple[str, ...] = (METAFED_CLIENT_APP,)):
    """The ClientApp to run for a bundle: the one it names, if this node allows it."""
    reference = bundle_client_app(fab_content)
    if reference not in allowed:
        raise ClientAppRefused(f"the run's app bundle names the ClientApp {reference!r}: this node serves only "
                               f"{', '.join(allowed)} (metafed node --client-app)")
    return import_client_app(reference)
