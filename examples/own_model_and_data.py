"""Your own nn.Module on your own per-client data, with everything the CLI gives: a run
folder with metrics, plots and checkpoints, and an exact resume.

The data here is generated (each client draws 8x8 "images" of 3 classes, each class a
blurred blob at its own position, with a client-specific brightness shift): replace
``make_clients`` with your tensors. Run:  python examples/own_model_and_data.py [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from metafed import RunConfig, run
from metafed.data.federated import ClientData, FederatedDataset


class SmallConvNet(nn.Module):
    """conv3x3x8 - GroupNorm - pool - linear; GroupNorm, not BatchNorm (metafed refuses
    layers with running statistics)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x.reshape(-1, 1, 8, 8))))
        return self.out(nn.functional.max_pool2d(h, 2).flatten(1))


def make_clients(num_clients: int = 6, per_client: int = 60, seed: int = 0) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 2.0], [5.0, 5.0], [2.0, 5.0]])
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)  # [8, 8, 2]
    clients = []
    for c in range(num_clients):
        y = torch.randint(0, 3, (per_client,), generator=g)
        blobs = torch.exp(-((grid[None] - centres[y][:, None, None]) ** 2).sum(-1) / 3.0)  # [n, 8, 8]
        x = blobs + 0.9 * torch.randn(per_client, 8, 8, generator=g) + 0.2 * c / num_clients
        cut = per_client * 4 // 5
        clients.append(ClientData(x[:cut].reshape(cut, 64), y[:cut], x[cut:].reshape(-1, 64), y[cut:],
                                  name=f"site-{c}"))
    return clients


def main(out: Path) -> None:
    data = FederatedDataset("blobs", make_clients(), input_shape=(64,), num_classes=3)
    cfg = RunConfig(num_clients=len(data.clients), clients_per_round=3, rounds=4, lr=0.1, batch_size=10,
                    out=out, progress=False)
    first = run(cfg.updated(rounds=2), model=SmallConvNet, data=data)
    resumed = run(RunConfig(rounds=4, progress=False), resume=out, model=SmallConvNet, data=data)
    print(f"rounds 1-2: global accuracy {first.rows[-1]['global_accuracy']:.3f}; resumed to round 4: "
          f"{resumed.rows[-1]['global_accuracy']:.3f}; run folder {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/own-model"))
