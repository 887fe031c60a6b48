"""scikit-learn's handwritten digits (8x8, 1797 images): the task of the demo, the tests and the
studies (not part of the installed package: it needs scikit-learn).

Data is standardised with training statistics and split once with a fixed seed. Every worker
reads a disjoint, deterministic shard of each global batch, so a run with N ranks and its
single-process simulation see exactly the same samples.

Imported as ``from harness import digits``, with the repository's root on ``sys.path``
(harness/__init__.py).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test) as float32 / int64 torch tensors."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train]),
            torch.from_numpy(x[test]), torch.from_numpy(y[test]))


def make_model(hidden: int = 128, seed: int = 0) -> nn.Module:
    """A two-hidden-layer MLP (~26k parameters); same weights for the same seed on every rank."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.uniform_(-bound, bound, generator=g)
            else:
                p.zero_()
    return model


def base_optimizer(model: nn.Module, base: str = "adam") -> torch.optim.Optimizer:
    """The optimizer the tests wrap on this task: Adam (lr 2e-3) or SGD with momentum (lr 0.05,
    momentum 0.9)."""
    if base == "adam":
        return torch.optim.Adam(model.parameters(), lr=2e-3)
    if base == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    raise ValueError(f"base must be 'adam' or 'sgd', got {base!r}")


def batches(n_samples: int, global_batch: int, epoch: int, seed: int = 0):
    """Index arrays of each global batch of one epoch (same order on every rank)."""
    order = np.random.default_rng((seed, epoch)).permutation(n_samples)
    for start in range(0, n_samples - global_batch + 1, global_batch):
        yield order[start:start + global_batch]


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The rank's contiguous share of a global batch."""
    return np.array_split(indices, world_size)[rank]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train(rank: int, world_size: int, make_optimizer, epochs: int = 10, global_batch: int = 96,
          hidden: int = 128, seed: int = 0, max_steps: int | None = None, on_step=None, on_epoch=None,
          dtype: torch.dtype = torch.float32, device="cpu"):
    """Data-parallel training of the digits MLP on this rank's shards.

    ``make_optimizer(model) -> optimizer`` builds the (distributed) optimizer. Every rank starts from
    the same weights (same seed), so no broadcast is needed for correctness here; real scripts call
    ``hvd.broadcast_parameters`` anyway. Returns (model, history) with per-epoch mean train loss
    (over this rank's batches) and test accuracy. ``dtype``, ``device``: of the model and the inputs.
    """
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    x_train, x_test = x_train.to(device, dtype), x_test.to(device, dtype)
    y_train, y_test = y_train.to(device), y_test.to(device)
    model = make_model(hidden, seed).to(device, dtype)
    opt = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    history, step = [], 0
    for epoch in range(epochs):
        losses = []
        for idx in batches(len(x_train), global_batch, epoch, seed):
            i = shard(idx, rank, world_size)
            opt.zero_grad()
            loss = loss_fn(model(x_train[i]), y_train[i])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, opt)
            if max_steps is not None and step >= max_steps:
                break
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                        "test_accuracy": accuracy(model, x_test, y_test)})
        if on_epoch is not None:
            on_epoch(history[-1], opt)
        if max_steps is not None and step >= max_steps:
            break
    return model, history
