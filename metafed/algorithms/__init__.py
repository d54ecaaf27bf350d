"""Algorithm registry: CLI name -> (one-line description, paper, factory from a RunConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from metafed.aggregate.server_opt import ServerOptimizer, server_optimizer
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram, ServerState
from metafed.algorithms.ditto import Ditto, DittoSection
from metafed.algorithms.fedavg import FedAvg, FedAvgSection, FedProxSection
from metafed.algorithms.local_opt import LocalOptimizer
from metafed.algorithms.maml import MAML, FOMAMLSection, MAMLSection
from metafed.algorithms.meta_sgd import MetaSGD, MetaSGDSection
from metafed.algorithms.meta_updater import MetaUpdater, MetaUpdaterSection
from metafed.algorithms.per_fedavg import PerFedAvg, PerFedAvgFOSection, PerFedAvgHFSection
from metafed.algorithms.personalized_fedavg import PersonalizedFedAvg, PersonalizedFedAvgSection
from metafed.algorithms.pfedme import PFedMe, PFedMeSection
from metafed.algorithms.reptile import Reptile, ReptileSection
from metafed.distill.fd import FDSection
from metafed.distill.feddf import FedDFSection
from metafed.distill.fedmd import FedMDSection
from metafed.models import FunctionalModel
from metafed.section import Section

if TYPE_CHECKING:
    from metafed.config import RunConfig


@dataclass(frozen=True)
class AlgorithmSpec:
    summary: str
    paper: str
    # None: a distillation algorithm, built with its dataset (metafed.distill.make_distillation)
    build: Callable[["RunConfig", FunctionalModel, ServerOptimizer], FederatedAlgorithm] | None
    section: type[Section]  # its parameters: the config's `algorithm:` section when it is chosen


def local_optimizer(cfg: "RunConfig") -> LocalOptimizer:
    """The client optimizer of the algorithms whose local solver is free (--local-optimizer)."""
    return LocalOptimizer(cfg.local_optimizer, cfg.lr, cfg.local_momentum)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec(
        "local SGD, sample-weighted averaging; --server-optimizer adam|yogi, --server-momentum for FedAvgM",
        "McMahan et al., AISTATS 2017, arXiv:1602.05629",
        lambda cfg, model, opt: FedAvg(model, opt, cfg.lr, 0.0, local_optimizer(cfg)), FedAvgSection),
    "fedprox": AlgorithmSpec(
        "FedAvg with the proximal term mu/2 ||w - w_global||^2 (--mu); keeps stragglers' partial work",
        "Li et al., MLSys 2020, arXiv:1812.06127",
        lambda cfg, model, opt: FedAvg(model, opt, cfg.lr, cfg.mu, local_optimizer(cfg)), FedProxSection),
    "reptile": AlgorithmSpec(
        "Reptile server step theta += eps * mean(theta_i - theta); eps = --server-lr, --reptile-anneal",
        "Nichol & Schulman 2018, arXiv:1803.02999",
        lambda cfg, model, opt: Reptile(model, opt, cfg.lr, cfg.rounds if cfg.reptile_anneal else None,
                                        local_optimizer(cfg)), ReptileSection),
    "maml": AlgorithmSpec(
        "FedMeta-MAML: support/query steps, true second-order meta-gradient (--inner-lr alpha, --lr beta)",
        "Finn et al., ICML 2017; Chen et al. 2018, arXiv:1802.07876",
        lambda cfg, model, opt: MAML(model, opt, cfg.lr, cfg.inner_lr, cfg.inner_steps, first_order=False), MAMLSection),
    "fomaml": AlgorithmSpec(
        "first-order MAML: gradient of the query loss at the adapted point",
        "Finn et al., ICML 2017, arXiv:1703.03400",
        lambda cfg, model, opt: MAML(model, opt, cfg.lr, cfg.inner_lr, cfg.inner_steps, first_order=True), FOMAMLSection),
    "meta-sgd": AlgorithmSpec(
        "FedMeta-Meta-SGD: per-parameter inner learning rates learned with the initialisation",
        "Li et al. 2017, arXiv:1707.09835; Chen et al. 2018, arXiv:1802.07876",
        lambda cfg, model, opt: MetaSGD(model, opt, cfg.lr, cfg.inner_lr), MetaSGDSection),
    "per-fedavg-fo": AlgorithmSpec(
        "Per-FedAvg, first-order MAML local steps (alpha = --inner-lr, beta = --lr)",
        "Fallah et al., NeurIPS 2020, arXiv:2002.07948",
        lambda cfg, model, opt: PerFedAvg(model, opt, cfg.inner_lr, cfg.lr, hessian_free=False), PerFedAvgFOSection),
    "per-fedavg-hf": AlgorithmSpec(
        "Per-FedAvg, Hessian-free: Hessian-vector product on a third independent batch",
        "Fallah et al., NeurIPS 2020, arXiv:2002.07948",
        lambda cfg, model, opt: PerFedAvg(model, opt, cfg.inner_lr, cfg.lr, hessian_free=True), PerFedAvgHFSection),
    "personalized-fedavg": AlgorithmSpec(
        "FedAvg (server momentum) with long local epochs, then Reptile rounds (--stage2-server-optimizer), "
        "then local fine-tuning (--stage1-rounds)",
        "Jiang et al. 2019, arXiv:1909.12488",
        lambda cfg, model, opt: PersonalizedFedAvg(
            model, opt, server_optimizer(cfg, cfg.stage2_server_optimizer, cfg.stage2_server_lr, prefix="stage2."),
            cfg.lr, cfg.stage1_rounds if cfg.stage1_rounds is not None else cfg.rounds // 2,
            cfg.stage1_epochs or cfg.local_epochs, local_optimizer(cfg)), PersonalizedFedAvgSection),
    "pfedme": AlgorithmSpec(
        "Moreau-envelope personal models (--pfedme-lambda, --pfedme-steps K, --personal-lr); beta = --server-lr",
        "Dinh et al., NeurIPS 2020, arXiv:2006.08848",
        lambda cfg, model, opt: PFedMe(model, opt, cfg.lr, cfg.personal_lr or cfg.lr, cfg.pfedme_lambda,
                                       cfg.pfedme_steps), PFedMeSection),
    "ditto": AlgorithmSpec(
        "global FedAvg update plus a personal model pulled to the global one (--ditto-lambda)",
        "Li et al., ICML 2021, arXiv:2012.04221",
        lambda cfg, model, opt: Ditto(model, opt, cfg.lr, cfg.personal_lr or cfg.lr, cfg.ditto_lambda), DittoSection),
    "meta-updater": AlgorithmSpec(
        "personal models + meta-updaters u_i trained on a validation split; server applies aggregated u",
        "metafed seed document 000 (design in metafed/algorithms/meta_updater.py)",
        lambda cfg, model, opt: MetaUpdater(model, opt, cfg.lr, cfg.meta_lr or cfg.lr, cfg.meta_alpha, cfg.meta_mix,
                                            cfg.meta_val_period, cfg.meta_order == "second", cfg.meta_formulation), MetaUpdaterSection),
    "fedmd": AlgorithmSpec(
        "federated distillation: own models, consensus logits on public inputs, digest then revisit "
        "(--client-models for heterogeneous architectures)",
        "Li and Wang, NeurIPS-W 2019, arXiv:1910.03581", None, FedMDSection),
    "feddf": AlgorithmSpec(
        "FedAvg per architecture group, then server distillation of all clients' ensemble on public inputs",
        "Lin et al., NeurIPS 2020, arXiv:2006.07242", None, FedDFSection),
    "fd": AlgorithmSpec(
        "federated distillation without public data: per-label mean logits as each client's teacher",
        "Jeong et al., NeurIPS-W 2018, arXiv:1811.11479", None, FDSection),
}


def make_algorithm(cfg: "RunConfig", model: FunctionalModel, dataset=None,
                   model_name: str = "", **deployed) -> FederatedAlgorithm:
    """The algorithm a config names; the distillation algorithms (:mod:`metafed.distill`)
    also need the ``dataset`` (its clients, classes and public inputs), or in deployment its
    stand-ins (``num_clients``, ``public``: :func:`metafed.distill.make_distillation`)."""
    if cfg.algorithm.name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {cfg.algorithm.name!r}; choose one of {', '.join(ALGORITHMS)}")
    spec = ALGORITHMS[cfg.algorithm.name]
    if spec.build is None:
        from metafed.distill import make_distillation

        if dataset is None:
            raise ValueError(f"--algorithm {cfg.algorithm.name} builds one model per client group: it needs the dataset")
        return make_distillation(cfg, dataset, model, model_name, **deployed)
    return spec.build(cfg, model, server_optimizer(cfg))


__all__ = ["ALGORITHMS", "AlgorithmSpec", "FederatedAlgorithm", "LocalProgram", "ServerState", "make_algorithm",
           "server_optimizer"]
