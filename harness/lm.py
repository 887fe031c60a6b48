#!/usr/bin/env python3
"""A small byte-level causal Transformer LM and a corpus that needs no download.

Model: vocab 256 (bytes), learned positions, pre-LN blocks (LN -> causal self-attention -> +,
LN -> GELU MLP (4x) -> +), final LN, untied output head. ``make_lm(size)`` builds one of

    tiny   d=128, 2 layers, 4 heads, ctx 64      (  470,784 parameters)
    small  d=256, 3 layers, 4 heads, ctx 128     (2,533,888 parameters)
    base   d=384, 6 layers, 6 heads, ctx 128     (10,893,568 parameters)

(``python harness/lm.py`` prints the exact counts and checks them.)

Data: the Python standard library's own source, which exists wherever Python does:
``sysconfig.get_paths()['stdlib']``, the ``.py`` files under it in a fixed sorted order (without
site-/dist-packages, tests and caches), concatenated as bytes up to a byte budget (4 MB by default);
the last 5 % is the held-out validation slice. The corpus depends on the Python version, so
ranks on different machines must run the same one; ``Corpus.fingerprint`` (CRC32) lets a
training script check that.

    from harness import lm
    model = lm.make_lm("tiny")
    corpus = lm.load_corpus()
    sampler = lm.BatchSampler(corpus.train, model.ctx, batch=8, seed=0, rank=hvd.rank())
    x, y = sampler.batch(step)                      # deterministic in (seed, rank, step)
    val_loss = lm.evaluate(model, corpus.val)       # mean cross-entropy (nats/byte)
"""
from __future__ import annotations

import math
import os
import sysconfig
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256

SIZES = {
    #        d_model, layers, heads, ctx
    "tiny": (128, 2, 4, 64),
    "small": (256, 3, 4, 128),
    "base": (384, 6, 6, 128),
}
EXPECTED_PARAMS = {"tiny": 470_784, "small": 2_533_888, "base": 10_893_568}


# ---------------------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        assert d % heads == 0, "d_model must be a multiple of the number of heads"
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.d, self.layers, self.heads, self.ctx = d, layers, heads, ctx
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        self._init()

    def _init(self):
        # GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        """idx: (batch, t) int64 bytes, t <= ctx -> logits (batch, t, 256)."""
        t = idx.shape[1]
        if t > self.ctx:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.ctx}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, x, y):
        """Mean next-byte cross-entropy (nats per byte)."""
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def make_lm(size: str = "tiny", seed: int = 0) -> ByteLM:
    """Build the LM of this size ("tiny", "small", "base") with weights drawn from ``seed``."""
    if size not in SIZES:
        raise ValueError(f"unknown LM size {size!r}; choose from {sorted(SIZES)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ByteLM(*SIZES[size])
    finally:
        torch.random.set_rng_state(state)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    train: torch.Tensor        # uint8
    val: torch.Tensor          # uint8
    files: int                 # how many source files went in
    fingerprint: int           # CRC32 of the whole byte string
    source: str                # a description (no machine paths: the Python version)

    @property
    def nbytes(self) -> int:
        return self.train.numel() + self.val.numel()


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's .py files, as paths relative to ``root``, in a fixed sorted order."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return sorted(out)


def load_corpus(budget_bytes: int = 4 << 20, val_fraction: float = 0.05, root: str | None = None) -> Corpus:
    """Concatenate the stdlib sources (sorted) up to ``budget_bytes``; the last ``val_fraction`` is validation."""
    import sys
    root = root or sysconfig.get_paths()["stdlib"]
    chunks, total, files = [], 0, 0
    for rel in stdlib_files(root):
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
        except OSError:
            continue
        data = data[: budget_bytes - total]
        chunks.append(data)
        total += len(data)
        files += 1
        if total >= budget_bytes:
            break
    blob = b"".join(chunks)
    if len(blob) < 10_000:
        raise RuntimeError(f"only {len(blob)} bytes of Python sources found under the stdlib path")
    arr = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    n_val = max(1, int(len(blob) * val_fraction))
    return Corpus(train=arr[:-n_val].clone(), val=arr[-n_val:].clone(), files=files,
                  fingerprint=zlib.crc32(blob) & 0xFFFFFFFF,
                  source=f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro} "
                         f"standard library, {files} files, {len(blob):,} bytes")


class BatchSampler:
    """Random windows of the training slice; batch ``step`` depends only on (seed, rank, step)."""

    def __init__(self, data: torch.Tensor, ctx: int, batch: int, seed: int = 0, rank: int = 0):
        if data.numel() < ctx + 2:
            raise ValueError("training slice shorter than one window")
        self.data, self.ctx, self.batch_size, self.seed, self.rank = data, ctx, batch, seed, rank
        self._arange = torch.arange(ctx + 1)

    def batch(self, step: int):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + step)
        starts = torch.randint(0, self.data.numel() - self.ctx - 1, (self.batch_size,), generator=g)
        w = self.data[starts[:, None] + self._arange].long()
        return w[:, :-1], w[:, 1:]


def eval_windows(val: torch.Tensor, ctx: int, n_windows: int = 128) -> torch.Tensor:
    """Start offsets of ``n_windows`` evenly spaced windows over the validation slice (fixed)."""
    last = val.numel() - ctx - 1
    if last < 0:
        raise ValueError("validation slice shorter than one window")
    n = min(n_windows, last + 1)
    return torch.linspace(0, last, n).round().long()


@torch.no_grad()
def evaluate_sum(model: ByteLM, val: torch.Tensor, n_windows: int = 128, batch: int = 32, rank: int = 0,
                 size: int = 1) -> tuple[float, int]:
    """(sum of per-byte cross-entropies, number of bytes) over this rank's share of the fixed windows.

    Windows are dealt round-robin to ``size`` ranks; summing the pairs over ranks gives the
    full-set mean, identical to ``evaluate(model, val, n_windows)`` on one process (up to float
    summation order)."""
    was_training = model.training
    model.eval()
    ctx = model.ctx
    starts = eval_windows(val, ctx, n_windows)[rank::size]
    ar = torch.arange(ctx + 1)
    total, count = 0.0, 0
    for i in range(0, starts.numel(), batch):
        w = val[starts[i:i + batch, None] + ar].long()
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total, count


def evaluate(model: ByteLM, val: torch.Tensor, n_windows: int = 128, batch: int = 32) -> float:
    """Mean validation cross-entropy (nats per byte) over a fixed set of ``n_windows`` windows."""
    total, count = evaluate_sum(model, val, n_windows, batch)
    return total / count


if __name__ == "__main__":
    for name in SIZES:
        m = make_lm(name)
        n = count_params(m)
        d, layers, heads, ctx = SIZES[name]
        flag = "" if n == EXPECTED_PARAMS[name] else f"  (!= documented {EXPECTED_PARAMS[name]:,})"
        print(f"{name:<6} d={d:<4} layers={layers} heads={heads} ctx={ctx:<4} {n:>12,} parameters"
              f"  ({4 * n / 1e6:.1f} MB fp32){flag}")
    c = load_corpus()
    print(f"corpus: {c.source}; train {c.train.numel():,} B, val {c.val.numel():,} B, crc32 {c.fingerprint:08x}")
    print(f"tiny, untrained: val loss {evaluate(make_lm('tiny'), c.val):.4f} nats/byte (ln 256 = {math.log(256):.4f})")
