"""Reference models. All are plain ``nn.Module``s that stay vmappable (no cuDNN/MKLDNN-only
ops), so the vectorized backend can stack them along a client axis."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: softmax(W x + b)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network, e.g. 60-200-10 (workload W1) or 60-20-10 (pFedMe DNN)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        dims = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.out(h)


class FemnistCNN(nn.Module):
    """The LEAF FEMNIST CNN (Caldas et al., "LEAF", arXiv:1812.01097): conv5x5x32 - pool -
    conv5x5x64 - pool - dense 2048 - output (6.6 M parameters). ``channels`` and ``dense``
    shrink it: model ``small-cnn`` is conv5x5x8 - pool - conv5x5x16 - pool - dense 128
    (0.11 M parameters, ~1 MFLOP per sample), sized for CPU-only reproductions. Input
    [B, side*side] or [B, 1, side, side]."""

    def __init__(self, num_classes: int = 62, side: int = 28, channels: tuple[int, int] = (32, 64),
                 dense: int = 2048):
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, channels[0], 5, padding=2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5, padding=2)
        pooled = side // 4
        self.fc = nn.Linear(channels[1] * pooled * pooled, dense)
        self.out = nn.Linear(dense, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, self.side, self.side)
        h = F.max_pool2d(torch.relu(self.conv1(h)), 2)
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = torch.relu(self.fc(h.flatten(1)))
        return self.out(h)


class CharLSTM(nn.Module):
    """Small next-character LSTM for LEAF Shakespeare: embedding, one LSTM layer written
    with plain linear maps (so it vmaps), and a linear read-out of the last hidden state.
    Input [B, T] int64 character ids; output [B, vocab] logits."""

    def __init__(self, vocab_size: int = 80, embed_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.hidden_size = hidden
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.input_gates = nn.Linear(embed_dim, 4 * hidden)
        self.hidden_gates = nn.Linear(hidden, 4 * hidden, bias=False)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x.long())  # [B, T, E]
        gx = self.input_gates(e)  # [B, T, 4H], all timesteps at once
        h = gx.new_zeros(gx.shape[0], self.hidden_size)
        c = torch.zeros_like(h)
        for t in range(gx.shape[1]):
            i, f, g, o = (gx[:, t] + self.hidden_gates(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h)
