"""Federated distillation with heterogeneous client models: FedMD, FedDF and FD.

``--client-models mlp:0.5,small-cnn:0.5`` splits the clients into architecture groups
(:mod:`metafed.distill.groups`); each group trains vectorized, and only logits on shared
inputs (FedMD, FedDF's server) or per-label logits (FD) connect the groups. The public
inputs are a documented split (:mod:`metafed.data.public`). The round and evaluation
run in the synchronous round driver (:mod:`metafed.federation`) and the simulation pool's
group evaluation (:mod:`metafed.pools.group_evaluation`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metafed.config import RunConfig
    from metafed.data.federated import FederatedDataset
    from metafed.distill.base import DistillationAlgorithm
    from metafed.models import FunctionalModel

DISTILLATION = ("fedmd", "feddf", "fd")
NEEDS_PUBLIC = ("fedmd", "feddf")
FEDDF_DEFAULT_LR = 1e-3


def make_distillation(cfg: "RunConfig", dataset: "FederatedDataset", model: "FunctionalModel",
                      model_name: str, num_clients: int | None = None, public=None) -> "DistillationAlgorithm":
    """The distillation algorithm a config names. Without ``--client-models`` every client
    runs ``model`` (the run's model, yours included); with it, each group a reference model
    sharing ``model``'s loss and score. In deployment neither side holds the federation:
    ``num_clients`` (the training clients, which the groups are drawn over) and ``public``
    (the public inputs: the server's for FedMD's broadcasts and FedDF's distillation; an empty
    tensor on a node, which receives what it scores in the broadcast) replace the dataset's."""
    from metafed.aggregate.server_opt import server_optimizer
    from metafed.distill.fd import FD
    from metafed.distill.feddf import FedDF
    from metafed.distill.fedmd import FedMD
    from metafed.distill.groups import ModelGroup, build_groups

    n = dataset.num_clients if num_clients is None else num_clients
    if cfg.client_models is None:
        groups = [ModelGroup(model_name, model, tuple(range(n)))]
    else:
        groups = build_groups(cfg.client_models, n, dataset.input_shape, dataset.num_classes, cfg.seed,
                              tuple(cfg.hidden), model.sample_loss, model.sample_score)
    empty = [g.name for g in groups if not g.members]
    if empty:
        raise ValueError(f"--client-models: no client runs {', '.join(empty)} among {n} clients (raise its share)")
    opt = server_optimizer(cfg)
    if cfg.algorithm.name == "fd":
        return FD(groups, opt, cfg.lr, cfg.distill_weight, cfg.distill_temperature, dataset.num_classes)
    public = dataset.public if public is None else public
    if public is None:
        raise ValueError(f"--algorithm {cfg.algorithm.name} needs public inputs: this dataset was built without them")
    if cfg.algorithm.name == "fedmd":
        return FedMD(groups, opt, cfg.lr, public, cfg.public_subset, cfg.distill_lr or cfg.lr, cfg.digest_epochs,
                     cfg.batch_size, cfg.seed, dataset.num_classes)
    return FedDF(groups, opt, cfg.lr, public, cfg.distill_steps, cfg.distill_lr or FEDDF_DEFAULT_LR,
                 cfg.distill_batch_size, cfg.distill_temperature, cfg.seed)


__all__ = ["DISTILLATION", "NEEDS_PUBLIC", "make_distillation"]
