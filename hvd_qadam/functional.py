"""Functional optimizer math used by the worker and server transforms (no state, no comms).

Written with separate multiply/add operations (no ``alpha=``/``addcmul``) on purpose: fused
multiply-adds can differ in the last bit between vectorised and scalar code paths, and the
project promises bit-identical results whether a buffer is processed whole or in shards.
"""
from __future__ import annotations

import torch


def adam_moments(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta1: float, beta2: float):
    """New (m, v) from gradient g; the inputs are not modified."""
    m_new = m * beta1 + g * (1.0 - beta1)
    v_new = v * beta2 + (g * g) * (1.0 - beta2)
    return m_new, v_new


def adam_step(m: torch.Tensor, v: torch.Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float,
              bias_correction: bool = True) -> torch.Tensor:
    """The Adam update lr * m_hat / (sqrt(v_hat) + eps) for a 1-based ``step``."""
    if bias_correction:
        m = m / (1.0 - beta1 ** step)
        v = v / (1.0 - beta2 ** step)
    return (m * lr) / (torch.sqrt(v) + eps)


def decoupled_weight_decay(update: torch.Tensor, x: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """AdamW-style decay folded into an update that is subtracted from x."""
    if weight_decay:
        return update + x * (lr * weight_decay)
    return update


def momentum_buffer(buf: torch.Tensor | None, g: torch.Tensor, momentum: float) -> torch.Tensor:
    """Heavy-ball buffer: buf = momentum * buf + g (a new tensor)."""
    if buf is None or not momentum:
        return g.clone()
    return buf * momentum + g
