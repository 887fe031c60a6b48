"""hvd_qadam.DistributedOptimizer: Horovod's DistributedOptimizer, with quantized communication.

It wraps a torch optimizer the way ``hvd.DistributedOptimizer`` does (a dynamic subclass of the
optimizer's own class built from its param_groups) and reads the same: pass the optimizer and
``named_parameters``, call ``backward()`` and ``step()``. Gradients (or updates, or weights,
depending on the algorithm) travel as packed low-bit payloads in a few fused messages per step.

Communication happens in ``step()`` (not in backward hooks): so gradient accumulation over
``backward_passes_per_step`` passes needs nothing special, and the same code path runs with one
process, with many, and in the simulator. With ``algorithm="qsgd"`` the averaged gradient is
written to ``p.grad`` and the wrapped optimizer steps; the Adam-family algorithms apply their own
update (their hyper-parameters are read live from ``param_groups``, so lr schedulers work).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .config import Config, LinkSpec, NONE_LINK
from .engine import OUT_GRAD, OUT_UPDATE, OUT_WEIGHTS, ConsistencyError, Engine
from .layout import Layout

STATE_KEY = "hvd_qadam"


class _QuantizedDistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, named_parameters, config: Config, backward_passes_per_step: int, comm):
        super(self.__class__, self).__init__(params)
        self._qcfg = config
        self.backward_passes_per_step = backward_passes_per_step
        all_params = [p for pg in self.param_groups for p in pg["params"]]
        if named_parameters is not None:
            named_parameters = list(named_parameters)
            if any(not isinstance(t, tuple) or len(t) != 2 for t in named_parameters):
                raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, "
                                 "usually model.named_parameters()")
            names = [n for n, _ in named_parameters]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                raise ValueError(f"parameter names in named_parameters must be unique; duplicates: {dups}")
            self._names = {p: n for n, p in named_parameters}
            missing = [i for i, p in enumerate(all_params) if p not in self._names]
            if missing:
                raise ValueError(f"named_parameters does not cover every optimized parameter (missing "
                                 f"{len(missing)} of {len(all_params)}); pass model.named_parameters()")
        else:
            self._names = {p: f"param.{gi}.{i}" for gi, pg in enumerate(self.param_groups)
                           for i, p in enumerate(pg["params"])}
        if comm is None:
            from .comm import HorovodComm
            comm = HorovodComm()
        self._comm = comm
        self._layout = Layout(self.param_groups, self._names, config.min_compress_numel,
                              config.fusion_threshold_bytes)
        self._engine = Engine(config, self._layout, comm, self._hyper)
        self._started = False
        self._should_synchronize = True
        self._synchronized = False
        self._local_iterations = 0

    # ----------------------------------------------------------------- public extras
    @property
    def config(self) -> Config:
        return self._qcfg

    @property
    def communication_stats(self):
        """Bytes sent/received by this rank in the last exchange (and running totals), and timings."""
        return self._engine.stats

    @property
    def engine(self) -> Engine:
        return self._engine

    def _hyper(self, param_group: int) -> dict:
        return self.param_groups[param_group]

    def _start(self):
        """First step: check that every rank has the same model and configuration (no hang, a clear error)."""
        mine = {"layout": self._layout.signature, "config": self._qcfg.as_dict()}
        everyone = self._comm.allgather_object(mine, name="hvd_qadam.handshake")
        for r, theirs in enumerate(everyone):
            if theirs == mine:
                continue
            if theirs["config"] != mine["config"]:
                diff = {k: (mine["config"][k], theirs["config"][k]) for k in mine["config"]
                        if mine["config"][k] != theirs["config"].get(k)}
                raise ConsistencyError(f"hvd_qadam configuration differs between rank {self._comm.rank} and rank {r}: "
                                       + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
            a, b = mine["layout"], theirs["layout"]
            detail = next((f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y),
                          f"{len(a)} vs {len(b)} parameters")
            raise ConsistencyError(f"parameters differ between rank {self._comm.rank} and rank {r} "
                                   f"(name, shape, dtype, group, compressed): {detail}")
        params = self._tensors(grads=False)
        self._engine.start(params)
        if self._qcfg.topology == "ps":
            self._comm.hello(self._engine, params)
        self._started = True

    def _tensors(self, grads: bool) -> dict:
        out = {}
        for name, p in self._layout.params():
            if grads:
                out[name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
            else:
                out[name] = p.detach()
        return out

    # ----------------------------------------------------------------- Horovod-style API
    def synchronize(self):
        """Exchange gradients now (``algorithm="qsgd"`` only): afterwards p.grad holds the average,
        e.g. for gradient clipping before ``with optimizer.skip_synchronize(): optimizer.step()``."""
        if self._engine.kind != OUT_GRAD:
            raise RuntimeError(f"synchronize() exchanges gradients; algorithm {self._qcfg.algorithm!r} "
                               "exchanges updates inside step()")
        return self._exchange_and_apply()

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def _exchange_and_apply(self) -> bool:
        if not self._started:
            self._start()
        out = self._engine.step(self._tensors(grads=True), self._tensors(grads=False))
        if out is None:
            return False          # skipped (nonfinite="skip"): nothing changed
        with torch.no_grad():
            for name, p in self._layout.params():
                value = out[name]
                if self._engine.kind == OUT_GRAD:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(value)
                elif self._engine.kind == OUT_UPDATE:
                    p.sub_(value.to(p.dtype))
                elif self._engine.kind == OUT_WEIGHTS:
                    p.copy_(value)
        self._synchronized = True
        return True

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._qcfg.algorithm == "local_sgd":
            if not self._started:
                self._start()
            super(self.__class__, self).step()          # local step on local gradients
            self._local_iterations += 1
            if self._local_iterations % self._qcfg.sync_every == 0:
                self._exchange_and_apply()              # average the models
            return loss
        if self._engine.kind == OUT_GRAD:
            if self._should_synchronize:
                if self._synchronized:
                    warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                                  "optimizer.synchronize(); gradients are exchanged again", stacklevel=2)
                applied = self._exchange_and_apply()
            else:
                applied = True
            self._synchronized = False
            if applied:
                super(self.__class__, self).step()
            return loss
        self._exchange_and_apply()
        self._synchronized = False
        return loss

    def zero_grad(self, set_to_none: bool = True):
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """The wrapped optimizer's state plus this rank's hvd_qadam state (residuals, worker and server
        moments, step counters, learned levels, world size and topology). Residuals are per rank:
        save one file per rank to resume the exact trajectory."""
        sd = super(self.__class__, self).state_dict()
        sd[STATE_KEY] = self._engine.state_dict()
        if self._qcfg.topology == "ps" and self._started:
            status, server = self._comm.ps_request(("state",))   # the server's moments and residuals
            sd[STATE_KEY]["ps_server"] = server
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is not None:
            self._engine.load_state_dict(ours)
            if self._qcfg.topology == "ps" and ours.get("ps_server") is not None:
                if not self._started:
                    self._start()
                self._comm.ps_request(("load", ours["ps_server"]))


def DistributedOptimizer(optimizer, named_parameters=None, *, algorithm: str = "qsgd",
                         quantizer: str = "qsgd", bits: int | None = None, bucket_size: int = 512,
                         rounding: str | None = None,
                         downlink_quantizer: str | None = None, downlink_bits: int | None = None,
                         downlink_bucket_size: int | None = None, downlink_rounding: str | None = None,
                         error_feedback: bool = True, server_error_feedback: bool = True,
                         topology: str = "allgather", warmup_steps: int = 0, min_compress_numel: int = 1024,
                         fusion_threshold_mb: float = 64, backward_passes_per_step: int = 1, seed: int = 0,
                         nonfinite: str = "raise", bias_correction: bool = True, momentum_steps: int | None = None,
                         sync_every: int = 1, level_schedule=(0, 100, 2000), level_every: int = 10000,
                         comm=None):
    """Wrap ``optimizer`` so that ``step()`` averages across ranks with quantized communication.

    algorithm: ``qsgd`` (quantized gradients, then ``optimizer`` steps), ``efficient_adam``
      (worker Adam, two-way quantization and EF), ``qadam`` (server Adam on quantized gradients),
      ``qadam_weights`` (server Adam, quantized weights down), ``ef_sgd`` (two-way EF momentum SGD),
      ``local_sgd`` (local steps, model averaging every ``sync_every``).
    quantizer/bits/bucket_size/rounding: the uplink (worker -> server) quantizer; ``downlink_*`` the
      server -> worker one (default: full precision). ``rounding=None`` means nearest where error
      feedback is on (EF needs a contractive compressor) and the quantizer's own default
      (stochastic for the unbiased ones) where it is off.
    topology: ``allgather`` (default), ``sharded`` (alltoall + allgather; per-rank traffic constant
      in N) or ``ps`` (a dedicated mpi4py server rank, see :mod:`hvd_qadam.ps`).
    """
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    # Error feedback needs a contractive compressor: an unbiased quantizer whose variance factor
    # exceeds 1 (QSGD at 4 bits, bucket 512: ~3) makes the residual grow without bound. Nearest
    # rounding is never worse than rounding to 0, so it is the default wherever EF is on.
    uplink = LinkSpec(quantizer, bits, bucket_size, rounding or ("nearest" if error_feedback else None))
    downlink = NONE_LINK if downlink_quantizer in (None, "none") else LinkSpec(
        downlink_quantizer, downlink_bits, downlink_bucket_size or bucket_size,
        downlink_rounding or ("nearest" if server_error_feedback and algorithm != "qadam_weights" else None))
    config = Config(algorithm=algorithm, topology=topology, uplink=uplink, downlink=downlink,
                    error_feedback=error_feedback, server_error_feedback=server_error_feedback, seed=seed,
                    warmup_steps=warmup_steps, min_compress_numel=min_compress_numel,
                    fusion_threshold_bytes=max(4, int(fusion_threshold_mb * (1 << 20))), nonfinite=nonfinite,
                    bias_correction=bias_correction, momentum_steps=momentum_steps, sync_every=sync_every,
                    level_schedule=tuple(level_schedule), level_every=level_every)
    if topology == "ps" and comm is None:
        from .ps import ps_worker_comm
        comm = ps_worker_comm()
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_QuantizedDistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, config, backward_passes_per_step, comm)
