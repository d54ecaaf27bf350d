"""A regression task: your own loss (mean squared error) and score (the share of predictions
within a tolerance, reported as accuracy), with FedAvg and with Ditto's personal models.

Each client's target is a shared linear function of 5 features plus a client-specific
offset, so one global model cannot fit every client and personal models should. Replace
``make_clients`` with your tensors (float targets [n] or [n, d]). Run:
python examples/regression.py [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from metafed import RunConfig, run
from metafed.data.federated import ClientData, FederatedDataset
from metafed.losses import mse, within


def make_clients(num_clients: int = 8, per_client: int = 80, seed: int = 0) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(5, generator=g)
    clients = []
    for c in range(num_clients):
        x = torch.randn(per_client, 5, generator=g)
        offset = 2.0 * (c / (num_clients - 1) - 0.5)  # -1 .. 1: what personalization has to learn
        y = x @ weights + offset + 0.1 * torch.randn(per_client, generator=g)  # float targets [n]
        cut = per_client * 3 // 4
        clients.append(ClientData(x[:cut], y[:cut], x[cut:], y[cut:], name=f"sensor-{c}"))
    return clients


def regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))  # outputs [B, 1]


def main(out: Path) -> None:
    data = FederatedDataset("offsets", make_clients(), input_shape=(5,), num_classes=1)
    task = dict(model=regressor, data=data, loss=mse, score=within(0.5))
    base = dict(num_clients=len(data.clients), clients_per_round=4, rounds=20, lr=0.05, batch_size=10,
                local_epochs=2, progress=False)
    fedavg = run(RunConfig(**base, out=out), **task)
    ditto = run(RunConfig(**base, algorithm="ditto", ditto_lambda=0.1, protocol="paper"), **task)
    final, personal = fedavg.rows[-1], ditto.rows[-1]
    print(f"FedAvg: global accuracy (within 0.5) {final['global_accuracy']:.3f}, test MSE {final['global_loss']:.3f}; "
          f"Ditto personal models: {personal['personalized_accuracy']:.3f}, MSE {personal['personalized_loss']:.3f}; "
          f"run folder {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/regression"))
