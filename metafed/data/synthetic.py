"""Synthetic(alpha, beta) of the FedProx paper (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020, arXiv:1812.06127), section 5.1.

Client k: u_k ~ N(0, alpha); W_k [10x60], b_k [10] ~ N(u_k, 1); B_k ~ N(0, beta);
v_k [60] ~ N(B_k, 1); x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2); y = argmax(W_k x + b_k).
Sizes n_k = (int(LogNormal(4, 2)) + 50) * size_multiplier. The IID variant shares one
W, b ~ N(0, 1) and x ~ N(0, Sigma) across clients. Draws follow the reference generator's
order with NumPy's legacy RandomState(seed), so seed 0 reproduces the published sizes.
"""
from __future__ import annotations

import numpy as np

DIM, NUM_CLASSES = 60, 10


def synthetic_clients(num_clients: int, alpha: float, beta: float, seed: int, iid: bool = False,
                      size_multiplier: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """List of (x float32 [n_k, 60], y int64 [n_k]) per client."""
    if num_clients < 1 or size_multiplier < 1:
        raise ValueError("synthetic data needs num_clients >= 1 and size_multiplier >= 1")
    if alpha < 0 or beta < 0:
        raise ValueError(f"synthetic alpha and beta must be >= 0, got {alpha}, {beta}")
    rs = np.random.RandomState(seed)
    sizes = (rs.lognormal(4, 2, num_clients).astype(int) + 50) * size_multiplier
    mean_w = rs.normal(0, alpha, num_clients)  # u_k
    mean_b = mean_w
    b_means = rs.normal(0, beta, num_clients)  # B_k
    std_x = np.power(np.arange(1, DIM + 1, dtype=np.float64), -1.2) ** 0.5
    mean_x = np.zeros((num_clients, DIM)) if iid else np.stack([rs.normal(b, 1, DIM) for b in b_means])
    if iid:
        w_global = rs.normal(0, 1, (DIM, NUM_CLASSES))
        b_global = rs.normal(0, 1, NUM_CLASSES)
    out = []
    for k in range(num_clients):
        w = w_global if iid else rs.normal(mean_w[k], 1, (DIM, NUM_CLASSES))
        b = b_global if iid else rs.normal(mean_b[k], 1, NUM_CLASSES)
        x = mean_x[k] + rs.standard_normal((sizes[k], DIM)) * std_x  # diagonal covariance
        y = np.argmax(x @ w + b, axis=1)
        out.append((x.astype(np.float32), y.astype(np.int64)))
    return out
