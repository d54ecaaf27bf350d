"""Reference models and the functional wrapper every backend uses."""
from __future__ import annotations

import torch
from torch import nn

from metafed.models.functional import FunctionalModel
from metafed.models.reference import CharLSTM, FemnistCNN, LogisticRegression, MLP

MODEL_NAMES = ("logistic", "mlp", "cnn", "small-cnn", "lstm")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
                hidden: tuple[int, ...] = (200,)) -> nn.Module:
    """Build a reference model with deterministic initial weights for ``seed``."""
    torch.manual_seed(seed)
    features = 1
    for d in input_shape:
        features *= d
    if name == "logistic":
        return LogisticRegression(features, num_classes)
    if name == "mlp":
        return MLP(features, tuple(hidden), num_classes)
    if name in ("cnn", "small-cnn"):
        side = int(round(features ** 0.5))
        if side * side != features:
            raise ValueError(f"model {name!r} needs square single-channel images, got input shape {input_shape}")
        return FemnistCNN(num_classes, side) if name == "cnn" else FemnistCNN(num_classes, side, (8, 16), 128)
    if name == "lstm":
        return CharLSTM(vocab_size=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def build_or_call(factory, name: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
                  hidden: tuple[int, ...] = (200,)) -> nn.Module:
    """``factory()`` (a user's model, called after seeding torch with ``seed``) or the
    reference model ``name``."""
    if factory is None:
        return build_model(name, input_shape, num_classes, seed, hidden)
    torch.manual_seed(seed)
    module = factory()
    if not isinstance(module, nn.Module):
        raise ValueError(f"model() must return a torch.nn.Module, got {type(module).__name__}")
    return module


__all__ = ["build_or_call", "FunctionalModel", "CharLSTM", "FemnistCNN", "LogisticRegression", "MLP", "MODEL_NAMES", "build_model"]
