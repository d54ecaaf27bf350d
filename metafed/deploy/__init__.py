"""Deployment on Flower's deployment engine (SuperLink, SuperNodes, ``flwr run``).

- ``wire``: nested tensor dicts <-> Flower ArrayRecords (numpy .npy, never pickle), and reply validation.
- ``node``: what a SuperNode's ClientApp holds: its data partition, model, algorithm, state on disk.
- ``client_app`` / ``server_app``: the Flower apps; the ServerApp drives metafed's round loop
  through :class:`~metafed.deploy.pool.FlowerPool`.
- ``apps``: :func:`flower_apps`: the two apps around your own ``nn.Module`` and node data.
- ``pool``: the round loop's client pool over the ServerApp's ``Grid``; ``secagg_wire`` /
  ``secagg_node``: metafed's secure aggregation between the apps; ``identity``: its keys.
- ``local``: ``metafed deploy-local``: a SuperLink and N SuperNodes on 127.0.0.1, one run.

Needs the ``deploy`` extra (``pip install "metafed[deploy]"``: flwr pinned to 1.42)."""

from metafed.deploy.apps import NodeData, flower_apps  # noqa: E402

__all__ = ["NodeData", "flower_apps"]
