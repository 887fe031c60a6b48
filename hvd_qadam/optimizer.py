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
import time
import warnings

import torch

from . import elastic
from . import exchange as exchange_policies
from .algorithms import ALGORITHMS
from .codec import ROUNDINGS
from .comm import ExcludedComm, HorovodComm, gloo_controller
from .compression import quantizer_of
from .config import Config, LinkSpec, NONE_LINK
from .engine import OUT_GRAD, OUT_UPDATE, STATE_KEY, Engine
from .errors import CommError, ConsistencyError, NonFiniteGradientError
from .layout import Layout
from . import stall
from .ps import ps_worker_comm
from .telemetry import from_options as telemetry_from_options, residual_ratio
from .quant import codebooks as cb
from .topology import AUTO, TOPOLOGIES as TOPOLOGY_CLASSES, Hosts, choose


class _QuantizedDistributedOptimizer(torch.optim.Optimizer):
    # Horovod's broadcast_optimizer_state() initialises the state of a fresh optimizer with a
    # *local* step when the optimizer's class comes from Horovod's optimizer module, and with a
    # communicating step() otherwise (which would make fresh ranks wait in our exchange while the
    # root rank waits in the broadcast). This class keeps Horovod's contract, so it takes the same
    # shortcut: the module name is the one Horovod checks for.
    __module__ = "horovod.torch.optimizer"

    def __init__(self, params, named_parameters, config: Config, backward_passes_per_step: int, comm,
                 overlap: bool, op_sum: bool):
        super(self.__class__, self).__init__(params)
        self.backward_passes_per_step = backward_passes_per_step
        self._op_sum = op_sum
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
            self._names = {p: f"allreduce.noname.{gi}.{i}" for gi, pg in enumerate(self.param_groups)
                           for i, p in enumerate(pg["params"])}
        self._parameter_names = dict(self._names)      # Horovod's attribute, read by its tests
        if comm is None:
            comm = HorovodComm()
        self._comm = comm
        self._layout = Layout(self.param_groups, self._names, config.min_compress_numel,
                              config.fusion_threshold_bytes, exact_float64=config.exact_float64,
                              passthrough_wire=config.passthrough_wire)
        self._engine = Engine(config, self._layout, comm, self._hyper)
        self._engine.alg.check_optimizer(self)
        narrowed = [s.name for g in self._layout.groups if g.dtype != torch.float64 for s in g.slots
                    if s.param.dtype == torch.float64]
        if narrowed:
            # Said once, at construction: Horovod would average these exactly in float64. Ours do
            # so only where they travel uncompressed under algorithm "qsgd" (Config.exact_float64).
            warnings.warn(f"{len(narrowed)} float64 parameter(s) (e.g. {narrowed[0]!r}) are quantized or run "
                          f"through algorithm {config.algorithm!r}, both of which work in float32: their averaged "
                          f"gradients/updates have float32 precision at best. Uncompressed groups under "
                          f"algorithm='qsgd' (quantizer='none', or tensors below min_compress_numel) stay "
                          f"float64; train in float32 otherwise", RuntimeWarning, stacklevel=3)
        self._engine.set_params_source(lambda g: [s.param for s in g.slots])
        self._started = False
        self._reshard = False             # server state to re-partition at the next start (elastic)
        self._committed_server = None     # the whole server state of the last elastic commit
        # topology="auto": (uplink, downlink_for, hierarchical), to choose again after a resize
        self._auto_topology = None
        # Elastic resets this optimizer went through: step, new rank and size, and how the server
        # state was carried over ("live", "committed", "none": nothing to carry, "reset": lost).
        self.elastic_resets = []
        self._should_synchronize = True
        self._synchronized = False
        self._local_iterations = 0
        self._telemetry = None            # hvd_qadam.telemetry.Telemetry where telemetry is on
        # Backward hooks: gradients are copied into a persistent flat buffer per group, and a
        # group's exchange starts as soon as its last gradient of the step arrived.
        self._grad_bufs = {g.index: torch.zeros(g.numel, dtype=g.dtype, device=g.device)
                           for g in self._layout.groups}
        self._slot_of = {s.param: (g, s) for g in self._layout.groups for s in g.slots}
        self._slot_index = {s.param: i for g in self._layout.groups for i, s in enumerate(g.slots)}
        self._delay = {p: backward_passes_per_step for p in self._slot_of}
        self._filled = {g.index: set() for g in self._layout.groups}
        self._sparse = set()          # parameters whose gradients came sparse (handed back sparse)
        if overlap and not getattr(comm, "excluded", False):
            for p in self._slot_of:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    # ----------------------------------------------------------------- public extras
    @property
    def config(self) -> Config:
        """The live configuration: the engine's (:attr:`Engine.cfg`), which its algorithm reads too."""
        return self._engine.cfg

    @property
    def communication_stats(self):
        """Bytes sent/received by this rank in the last exchange (and running totals), and timings."""
        return self._engine.stats

    @property
    def engine(self) -> Engine:
        return self._engine

    def _hyper(self, param_group: int) -> dict:
        return self.param_groups[param_group]

    def _check_world(self) -> None:
        """A resize that reached this optimizer without TorchState.sync() (Horovod skips the sync
        when hosts were only removed): the next step starts over with the handshake."""
        changed = getattr(self._comm, "world_changed", None)
        if self._started and changed is not None and changed():
            self._started = False
            self._reshard = True

    def _ensure_started(self) -> None:
        self._check_world()
        if not self._started:
            self._start()

    def _start(self):
        """First step, and first step after an elastic reset: check that every rank has the same
        model, configuration and step (no hang, a clear error); after a reset, with the rank and
        size Horovod has now, and the server state re-partitioned over them (:mod:`hvd_qadam.elastic`)."""
        refresh = getattr(self._comm, "refresh_world", None)
        if refresh is not None and refresh():
            self._reshard = True
        if (self._engine.rank, self._engine.size) != (self._comm.rank, self._comm.size):
            self._engine.set_world(self._comm.rank, self._comm.size)
            self._follow_world()
        mine = {"layout": self._layout.signature, "params": self._layout.param_signature,
                "config": dict(self._engine.alg.agreed_config(), ranks_per_host=self._engine.hosts.local_size),
                "step": self._engine.step_count, "elastic": elastic.reshard_summary(self)}
        everyone = self._comm.allgather_object(mine, name="hvd_qadam.handshake")
        for r, theirs in enumerate(everyone):
            if theirs["config"] != mine["config"]:
                diff = {k: (mine["config"][k], theirs["config"][k]) for k in mine["config"]
                        if mine["config"][k] != theirs["config"].get(k)}
                raise ConsistencyError(f"hvd_qadam configuration differs between rank {self._comm.rank} and rank {r}: "
                                       + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
            if mine["layout"] != theirs["layout"]:
                a, b = mine["params"], theirs["params"]
                detail = next((f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y),
                              f"{len(a)} vs {len(b)} parameters")
                raise ConsistencyError(f"parameters differ between rank {self._comm.rank} and rank {r} "
                                       f"(name, shape, dtype): {detail}")
        steps = [theirs["step"] for theirs in everyone]
        if len(set(steps)) > 1:
            # Horovod's resume pattern: rank 0 loads a checkpoint, hvd.broadcast_optimizer_state()
            # shares the wrapped optimizer's state, and hvd_qadam's own state exists on rank 0 only.
            # Every rank then starts the compression state afresh at rank 0's step, identically.
            warnings.warn(f"ranks start at different hvd_qadam steps {steps} (only some ranks restored an "
                          f"hvd_qadam checkpoint, e.g. rank 0 before hvd.broadcast_optimizer_state()): every "
                          f"rank resets its error-feedback residuals and hvd_qadam moments and continues at "
                          f"step {steps[0]}. Restore every rank from its own file to resume the exact "
                          f"trajectory", RuntimeWarning, stacklevel=3)
            self._engine.reset_state(steps[0])
        elif any(theirs["elastic"]["reshard"] for theirs in everyone):
            how = elastic.reshard(self, everyone)
            self.elastic_resets.append({"step": self._engine.step_count, "rank": self._comm.rank,
                                        "size": self._comm.size, "server_state": how})
        self._reshard = False
        params = {name: p.detach() for name, p in self._layout.params()}
        self._engine.start(params)
        if self._engine.transport.dedicated_server:
            self._comm.hello(self._engine, params)
        self._started = True

    def _follow_world(self) -> None:
        """``topology="auto"`` after an elastic resize: choose again for the new world, as a rank
        that joins it does at construction (every rank computes the choice from the same world, so
        old and new ranks agree in the handshake). The server state moves to the new layout with
        the re-partition that follows (:func:`hvd_qadam.elastic.reshard`)."""
        if self._auto_topology is None:
            return
        uplink, downlink_for, hierarchical = self._auto_topology
        hosts = getattr(self._comm, "hosts", None) or Hosts(self._comm.size, 1)
        topology, reason = choose(hosts, uplink, downlink_for, hierarchical)
        if topology != self._engine.cfg.topology:
            downlink = downlink_for(TOPOLOGY_CLASSES[topology])
            self._engine.set_topology(topology, downlink)
            self._reshard = True
        self._engine.topology_reason = self._engine.stats.topology_reason = reason

    # ----------------------------------------------------------------- gradients into groups
    def _copy_grad(self, g, s) -> None:
        grad = s.param.grad
        dst = self._grad_bufs[g.index][s.offset:s.offset + s.numel]
        if grad is None:
            dst.zero_()
            return
        if grad.is_sparse:
            # Exchanged dense (the payloads are dense codes) and handed back sparse, as Horovod
            # hands back what it got; sparse_as_dense only changes how Horovod itself would send it.
            self._sparse.add(s.param)
            grad = grad.to_dense()
        dst.view_as(s.param).copy_(grad)

    def _on_grad_ready(self, p) -> None:
        g, s = self._slot_of[p]
        self._delay[p] -= 1
        if self._delay[p] < 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        if self._delay[p] > 0:
            return                      # accumulating locally (backward_passes_per_step)
        if p in self._filled[g.index]:
            return
        self._copy_grad(g, s)
        self._filled[g.index].add(p)
        if not self._engine.can_launch_early():
            return
        if len(self._filled[g.index]) == len(g.slots):
            self._ensure_started()
            if self._engine.pending is None or g.index not in self._engine.pending.launched:
                self._engine.launch(g, self._grad_bufs[g.index], early=True)
            return
        if self._engine.pending is None:
            self._ensure_started()          # the step's first gradient: the world checked once
        if self._engine.tensorwise(g, self._engine.begin()):
            # a group that goes through Horovod's allreduce tensor by tensor: this one starts now
            self._engine.launch_tensor(g, self._slot_index[p], self._grad_bufs[g.index])

    def _grads_for(self, g) -> torch.Tensor:
        for s in g.slots:
            if s.param not in self._filled[g.index]:
                self._copy_grad(g, s)
        return self._grad_bufs[g.index]

    def _reset_round(self) -> None:
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        for f in self._filled.values():
            f.clear()

    # ----------------------------------------------------------------- Horovod-style API
    def synchronize(self):
        """Exchange gradients now (``algorithm="qsgd"`` only): afterwards p.grad holds the average,
        e.g. for gradient clipping before ``with optimizer.skip_synchronize(): optimizer.step()``."""
        if self._engine.kind != OUT_GRAD:
            raise RuntimeError(f"synchronize() exchanges gradients; algorithm {self._engine.cfg.algorithm!r} "
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
        if getattr(self._comm, "excluded", False):
            self._synchronized = True
            return True
        self._ensure_started()
        try:
            out = self._engine.finish(self._grads_for)
        except NonFiniteGradientError:
            if self._engine.cfg.nonfinite != "propagate":
                raise
            self._propagate_nonfinite()
            return True
        finally:
            self._reset_round()
        if out is None:
            return False          # skipped (nonfinite="skip"): nothing changed
        # Telemetry (off: None, and nothing else runs): the residual ratio before the apply loop,
        # which may write into buffers the gradients came from; the apply loop timed.
        record = self._telemetry is not None and self._telemetry.wants(self._engine.stats.step, self._engine.rank)
        if record:
            ratio, t_apply = residual_ratio(self._engine, self._grad_bufs), time.perf_counter()
        scale = float(self._comm.size) if self._op_sum else None
        with torch.no_grad():
            for g in self._layout.groups:
                flat = out[g.index]
                if scale is not None:
                    flat.mul_(scale)
                for s in g.slots:
                    p, value = s.param, flat[s.offset:s.offset + s.numel].view_as(s.param)
                    if self._engine.kind == OUT_GRAD:
                        if p in self._sparse:
                            p.grad = value.to(p.dtype).to_sparse()
                        elif value.dtype == p.dtype and value.device == p.device:
                            # A view of the group's persistent result buffer, not a copy (Horovod
                            # likewise repoints p.grad at its output with set_). The buffer is next
                            # written by the next exchange, which hands out fresh views anyway.
                            p.grad = value
                        elif p.grad is None or p.grad.is_sparse or p.grad.shape != p.shape:
                            p.grad = value.to(p.dtype).clone()
                        else:
                            p.grad.copy_(value)
                    elif self._engine.kind == OUT_UPDATE:
                        p.sub_(value.to(p.dtype))
                    else:
                        p.copy_(value)
        if record:
            self._telemetry.record(self._engine.stats, time.perf_counter() - t_apply, ratio, self._engine.size,
                                   self._engine.cfg)
        self._synchronized = True
        return True

    def _propagate_nonfinite(self) -> None:
        """Horovod's behaviour for a non-finite gradient on some rank: every rank's averaged
        gradient is non-finite, so a GradScaler (or any check) reaches the same decision everywhere."""
        with torch.no_grad():
            for name, p in self._layout.params():
                if p.grad is None:
                    p.grad = torch.full_like(p, float("nan"))
                else:
                    p.grad.fill_(float("nan"))
        self._synchronized = True

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self._comm, "excluded", False):
            super(self.__class__, self).step()      # not in the process set: a local step, as Horovod
            return loss
        if self._engine.alg.steps_locally:
            self._ensure_started()
            super(self.__class__, self).step()          # local step on local gradients
            self._reset_round()
            self._local_iterations += 1
            if self._local_iterations % self._engine.cfg.sync_every == 0:
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

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """The wrapped optimizer's state plus this rank's hvd_qadam state (residuals, worker and server
        moments, step counters, learned levels, world size and topology). Residuals are per rank:
        save one file per rank to resume the exact trajectory."""
        sd = super(self.__class__, self).state_dict()
        sd[STATE_KEY] = self._engine.state_dict()
        if self._engine.transport.dedicated_server and self._started:
            # the server's moments and residuals
            sd[STATE_KEY]["ps_server"] = _ps_answer(self._comm.ps_request(("state",)), "its state")
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is not None:
            self._engine.load_state_dict(ours)
            self._engine.alg.restore(self._engine)
            if self._engine.transport.dedicated_server and ours.get("ps_server") is not None:
                if not self._started:
                    self._start()
                _ps_answer(self._comm.ps_request(("load", ours["ps_server"])), "loading its state")


def DistributedOptimizer(optimizer, named_parameters=None, compression=None, backward_passes_per_step: int = 1,
                         op=None, gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                         sparse_as_dense: bool = False, process_set=None, *, algorithm: str = "qsgd",
                         quantizer: str | None = None, bits: int | None = None, bucket_size: int | None = None,
                         rounding: str | None = None,
                         downlink_quantizer: str | None = None, downlink_bits: int | None = None,
                         downlink_bucket_size: int | None = None, downlink_rounding: str | None = None,
                         error_feedback: bool = True, server_error_feedback: bool = True,
                         topology: str = "auto", hierarchical: bool | None = None, exchange: str | None = None,
                         warmup_steps: int = 0,
                         min_compress_numel: int = 1024,
                         fusion_threshold_mb: float | None = None, overlap: bool = True, seed: int = 0,
                         nonfinite: str | None = None, bias_correction: bool = True,
                         momentum_steps: int | None = None, sync_every: int = 1, level_schedule=(0, 100, 2000),
                         level_every: int = 10000, timeout: float | None = None, comm=None,
                         freeze_step: int | str | None = None, v_refresh_every: int | None = None,
                         telemetry=None, telemetry_every: int = 1):
    """Wrap ``optimizer`` so that ``step()`` averages across ranks with quantized communication.

    The first ten arguments are ``hvd.DistributedOptimizer``'s, with its meaning:

    optimizer: the torch optimizer to wrap (its class is subclassed, as Horovod does).
    named_parameters: ``model.named_parameters()``; names key the per-parameter state. Default:
      generated names (``_parameter_names`` holds them).
    compression: Horovod's ``hvd.Compression.none`` (default) or ``.fp16`` (an fp16 uplink, when
      ``quantizer`` is not given), or ours (:mod:`hvd_qadam.compression`).
    backward_passes_per_step (1): backward passes accumulated locally before an exchange.
    op: ``hvd.Average`` (default) or ``hvd.Sum`` (the average times the number of ranks;
      ``qsgd`` only); ``hvd.Adasum`` is refused.
    gradient_predivide_factor (1.0): accepted with ``op=Average``, where Horovod's result is the
      average whatever the factor (only its rounding differs); ours is computed as a mean.
    num_groups (0) / groups (None): ``num_groups=k`` fuses the parameters into about k groups;
      explicit ``groups`` lists are refused (use ``fusion_threshold_mb``).
    sparse_as_dense (False): sparse gradients (``nn.Embedding(sparse=True)``) are densified; without
      it a sparse gradient raises a clear error (the quantized exchange is dense).
    process_set: a Horovod process set: the optimizer averages over its ranks only.

    hvd_qadam's own options (keywords):

    algorithm ("qsgd"): ``qsgd`` (quantized gradients, then ``optimizer`` steps; any optimizer),
      ``efficient_adam`` (worker Adam, two-way quantization and EF), ``qadam`` (server Adam on
      quantized gradients), ``qadam_weights`` (server Adam, quantized weights down), ``ef_sgd``
      (two-way EF momentum SGD; wraps SGD), ``local_sgd`` (local steps, model averaging every
      ``sync_every``), ``onebit_adam`` (1-bit Adam: fp32 Adam for ``freeze_step`` steps, then v
      frozen and the momentum exchanged compressed). The math of each is in :mod:`hvd_qadam.algorithms`.
    quantizer ("qsgdinf") / bits (None) / bucket_size (None) / rounding (None): the uplink (worker ->
      server) quantizer. ``bits=None`` is 6 for ``qsgd`` and ``qsgdinf`` (at 4 bits the defaults
      trained a 10M-parameter LM 1.9 % above Horovod Adam, at 6 bits 0.2 %; README), the fixed
      width of ``sign``/``terngrad``, and 4 for the others. One fp32 scale per bucket;
      ``bucket_size=None`` is 128 (6.25 bits per element at 6 bits, 5.1x fewer bytes than fp32;
      measured closer to Horovod Adam than 512 on the LM, README), or 512 for the 1-bit ``sign``,
      whose payload a scale per 128 would grow by a quarter. ``rounding=None`` means nearest where
      error feedback is on (EF needs a contractive compressor) and the quantizer's own default
      where it is off. Under error feedback a setting whose residual would not settle (e.g.
      ``qsgd`` at 3 bits, bucket 128) is refused, and one that settles high (``qsgd`` at 4 bits,
      bucket 512) warned about, by a rule computed from the quantizer (:mod:`hvd_qadam.stall`).
    downlink_quantizer (None: the topology's default) / downlink_bits (None: by quantizer, as
      ``bits``) / downlink_bucket_size (the uplink's) / downlink_rounding: server -> workers
      (averaged gradients, updates; weights for ``qadam_weights``). ``None``: where the downlink
      crosses the network (``sharded``, ``hierarchical``, ``ps``) the uplink's quantizer at the
      uplink's width (``qsgdinf`` for an adaptive uplink), with server error feedback, so the bytes
      a rank moves stay flat in N; under ``allgather`` nothing travels down (every rank computes
      the result itself), so it is full precision. ``"none"``: full precision everywhere.
    error_feedback (True) / server_error_feedback (True): worker EF on the uplink / server EF on a
      quantized downlink (update-type algorithms).
    topology ("auto"): ``allgather`` (every rank gathers every payload: bytes per rank grow as
      N - 1 payloads), ``sharded`` (alltoall + allgather, each rank serves 1/N of the model: bytes
      per rank flat in N), ``hierarchical`` (a full-precision reduce-scatter inside each host, the
      sharded exchange only between hosts: 1/L of the host's inter-host bytes per rank),
      ``ps`` (a dedicated mpi4py server rank, see :mod:`hvd_qadam.ps`), or ``auto``: the one
      of ``allgather``/``sharded`` whose ranks send the fewest bytes across hosts
      (:func:`hvd_qadam.topology.choose`): ``allgather`` up to 2 ranks, ``sharded`` beyond, and
      ``hierarchical`` where the flat exchange would load each host's link more than Horovod's
      fp16 ring does (several ranks per host: from 4 per host at 12 ranks).
      ``communication_stats.topology`` / ``.topology_reason`` say which and why.
    hierarchical (None): whether ``auto`` runs the two-level exchange: None by the rule above,
      True always (as ``topology="hierarchical"``), False never. It moves 1/L of the inter-host
      bytes but runs four collective rounds per group instead of two.
      Hosts are Horovod's ``local_size`` ranks (``HVD_QADAM_LOCAL_SIZE`` overrides it).
    exchange (None: ``HVD_QADAM_EXCHANGE``, else ``"auto"``): the path of the compressible groups. ``"compressed"``: hvd_qadam's
      quantized exchange, every compressed step; ``"horovod"``: full precision through Horovod's
      allreduce (the algorithm's math on the exact mean); ``"auto"``: measured while training,
      the faster of the two (a few steps on each, the slowest rank's median step time, decided
      on every rank alike and revisited when the step time moves), see :mod:`hvd_qadam.exchange`;
      ``communication_stats.exchange`` / ``.exchange_reason`` say which and why. Whatever this
      says, every full-precision exchange (warm-up and v-refresh steps, tensors below
      ``min_compress_numel``, ``quantizer="none"``/``"fp16"``) goes through Horovod's allreduce,
      except where the server side keeps sharded state (``qadam`` under ``sharded``/``hierarchical``)
      or under ``ps``.
    warmup_steps (0): uncompressed steps first.
    min_compress_numel (1024): smaller tensors (biases, norms) travel unquantized: as fp32, or in
      2 bytes for bf16/fp16 parameters and under an fp16 uplink (``Config.passthrough_wire``).
    fusion_threshold_mb (None): size of a fused group; groups are formed in reverse registration
      order and each starts its exchange from a backward hook as soon as its gradients are ready.
      None: a quarter of the model's fp32 size, between 2 and 25 MB, so that a model of any size
      has a few groups whose exchanges overlap backward and each other (one group cannot).
    overlap (True): start exchanges from backward hooks (False: everything happens in ``step()``).
      Gradients changed between ``backward()`` and ``step()`` are not seen once their group has
      started, exactly as with Horovod; use ``synchronize()`` for clipping or unscaling.
    seed (0): seeds the counter-based rounding streams (seed, rank, step, group, direction).
    nonfinite: NaN/Inf on any rank: ``"propagate"`` (default for ``qsgd``: like Horovod, every rank's
      averaged gradient is non-finite, so GradScaler skips the step everywhere), ``"raise"``
      (default otherwise: every rank raises NonFiniteGradientError) or ``"skip"`` (every rank skips
      the step). In every case no residual, moment or weight changes.
    bias_correction (True): Adam bias correction (efficient_adam, qadam, qadam_weights, onebit_adam).
    momentum_steps (None): ``ef_sgd`` early momentum: momentum for the first E steps only.
    sync_every (1): ``local_sgd`` averaging period.
    freeze_step (None: 100 for ``onebit_adam``): ``onebit_adam``'s full-precision warm-up, after which
      v is frozen and compression starts (it sets ``warmup_steps``); ``"auto"``: freeze once the norm
      of the bias-corrected v changed by <= 5% over the last 20 steps (``warmup_steps``, if given,
      is then the latest freeze step). DeepSpeed suggests 15-25% of the run.
    v_refresh_every (None: 50 for ``onebit_adam``; 0: never, DeepSpeed's 1-bit Adam): after the
      freeze, every this many steps one step exchanges the gradient uncompressed (fp32) and
      refreshes v as if it had decayed through the steps since its last update: Adam's v keeps
      moving after the freeze, and a stale v under-steps (see ``algorithms.OnebitAdam``).
    level_schedule ((0, 100, 2000)) / level_every (10000): ALQ/AMQ refits at these steps, then every
      ``level_every`` after the last.
    timeout (None: HVD_QADAM_TIMEOUT, else 300 s): deadline of every collective. When it expires
      every live rank raises CollectiveTimeout naming the collective and the ranks that did not
      answer, and the job ends (non-zero) after HVD_QADAM_TIMEOUT_EXIT_GRACE seconds (10).
    comm: a transport (the simulator's); default Horovod.
    telemetry (None) / telemetry_every (1): per-exchange records written by rank 0 (of this
      optimizer's ranks) every ``telemetry_every`` steps: bytes sent and received, the ratio to
      Horovod's fp32 ring, encode / exchange-wait / decode / apply seconds, each group's path,
      whether the step was compressed, the topology, and ||EF residual|| / ||gradient||
      (:mod:`hvd_qadam.telemetry`). A path ending in ``.jsonl``: JSON lines; any other path: a
      directory for TensorBoard event files (``torch.utils.tensorboard``; ``telemetry.jsonl`` in
      it where TensorBoard is not installed). ``None``: the ``HVD_QADAM_TELEMETRY`` environment
      variable (a path, as above); unset: off, at no cost per step. ``scripts/plot_telemetry.py``
      plots a JSON-lines log.
    """
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {tuple(ALGORITHMS)}")
    op_sum = _check_op(op, gradient_predivide_factor, algorithm)
    if groups is not None:
        raise ValueError("explicit groups= are not supported: hvd_qadam fuses parameters into groups by size "
                         "(fusion_threshold_mb, or num_groups=k)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be a non-negative integer, got {num_groups!r}")
    if quantizer is None:
        quantizer = _quantizer_from_compression(compression)
    elif compression is not None and _quantizer_from_compression(compression) != "qsgdinf":
        raise ValueError(f"both compression={compression!r} and quantizer={quantizer!r} given; pass one")
    total = sum(p.numel() for pg in optimizer.param_groups for p in pg["params"] if p.requires_grad)
    if num_groups:
        fusion_threshold_mb = max(4 * total / num_groups, 4.0) / (1 << 20)
    elif fusion_threshold_mb is None:
        fusion_threshold_mb = min(25.0, max(2.0, total / (1 << 20)))      # 4 bytes x total / 4
    if downlink_rounding not in (None,) + ROUNDINGS:      # checked here: a pass-through downlink takes none
        raise cb.QuantizerError(f"downlink_rounding must be one of {ROUNDINGS}, got {downlink_rounding!r}")
    # Error feedback needs a contractive compressor: an unbiased quantizer whose variance factor
    # exceeds 1 (QSGD at 4 bits, bucket 512: ~3) makes the residual grow without bound. Nearest
    # rounding is never worse than rounding to 0, so it is the default wherever EF is on.
    uplink = LinkSpec(quantizer, bits, _bucket_size_for(quantizer, bucket_size),
                      rounding if rounding is not None else ("nearest" if error_feedback else None))

    def downlink_for(topology_class) -> LinkSpec:
        if downlink_quantizer == "none" or (downlink_quantizer is None and not topology_class.downlink_travels):
            return NONE_LINK
        if downlink_quantizer is None:       # the topology's default: the uplink's quantizer and width
            q = "qsgdinf" if cb.kind(uplink.quantizer).adaptive else uplink.quantizer
            q_bits = downlink_bits if downlink_bits is not None else bits
        else:
            q, q_bits = downlink_quantizer, downlink_bits
        if cb.kind(q).passthrough:
            return NONE_LINK if q == "none" else LinkSpec(q, q_bits, _bucket_size_for(q, downlink_bucket_size))
        return LinkSpec(q, q_bits, _bucket_size_for(q, downlink_bucket_size, bucket_size),
                        downlink_rounding if downlink_rounding is not None else
                        ("nearest" if server_error_feedback and ALGORITHMS[algorithm].server_ef else None))

    if hierarchical is not None and not isinstance(hierarchical, bool):
        raise ValueError(f"hierarchical must be None, True or False, got {hierarchical!r}")
    if topology not in TOPOLOGY_CLASSES and topology != AUTO:
        raise ValueError(f"unknown topology {topology!r}; choose one of {(AUTO,) + tuple(TOPOLOGY_CLASSES)}")
    if hierarchical and topology != AUTO and not TOPOLOGY_CLASSES[topology].two_level:
        raise ValueError(f"hierarchical=True asks for the two-level exchange, but topology={topology!r}; pass "
                         f"topology='auto' or 'hierarchical'")
    if topology != AUTO and TOPOLOGY_CLASSES[topology].dedicated_server and comm is None:
        _refuse_ps_under_gloo()
        comm = ps_worker_comm()
    if comm is None:
        ps_ = _process_set(process_set)
        comm = ExcludedComm() if ps_ is not None and not ps_.included() else HorovodComm(ps_, timeout=timeout)
    hosts = getattr(comm, "hosts", None) or Hosts(comm.size, 1)
    auto = topology == AUTO
    if auto:
        topology, topology_reason = choose(hosts, uplink, downlink_for, hierarchical)
    else:
        topology_reason = "given"
    downlink = downlink_for(TOPOLOGY_CLASSES[topology])
    config = Config(algorithm=algorithm, topology=topology, exchange=exchange or exchange_policies.default(), uplink=uplink, downlink=downlink,
                    error_feedback=error_feedback, server_error_feedback=server_error_feedback, seed=seed,
                    warmup_steps=warmup_steps, min_compress_numel=min_compress_numel,
                    fusion_threshold_bytes=max(4, int(fusion_threshold_mb * (1 << 20))), nonfinite=nonfinite,
                    bias_correction=bias_correction, momentum_steps=momentum_steps, sync_every=sync_every,
                    level_schedule=tuple(level_schedule), level_every=level_every, freeze_step=freeze_step,
                    v_refresh_every=v_refresh_every)
    stall.check(config)      # refuses (or warns about) settings error feedback cannot carry
    recorder = telemetry_from_options(telemetry, telemetry_every)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_QuantizedDistributedOptimizer.__dict__))
    if _on_horovod(comm):
        elastic.QuantizedOptimizer.register(cls)      # hvd.elastic.TorchState picks hvd_qadam's state handler
        elastic.register_state_handler()
    opt = cls(optimizer.param_groups, named_parameters, config, backward_passes_per_step, comm, overlap, op_sum)
    opt._engine.topology_reason = opt._engine.stats.topology_reason = topology_reason
    if auto:
        opt._auto_topology = (uplink, downlink_for, hierarchical)
    opt._engine.stats.topology = topology
    opt._engine.stats.exchange_reason = opt._engine.exchange.reason
    opt._telemetry = recorder
    return opt


def _ps_answer(reply, what: str):
    """The value of the parameter server's ``(status, value)`` reply; any status but "ok" raises
    CommError with the server's message (never a checkpoint without the server's state)."""
    status, value = reply
    if status != "ok":
        raise CommError(f"parameter server, {what}: {status}: {value}")
    return value


def _on_horovod(comm) -> bool:
    """Whether ``comm`` runs on Horovod's collectives (elastic training applies to these only)."""
    return isinstance(comm, HorovodComm)


def _refuse_ps_under_gloo() -> None:
    """``ps`` talks to its server rank over MPI (mpi4py), which a Gloo launch does not have."""
    if gloo_controller():
        raise ValueError("topology='ps' needs MPI: its server rank is reached with mpi4py, and Horovod runs its "
                         "Gloo controller here (horovodrun --gloo, or elastic), where there is no MPI world. "
                         "Launch with mpirun (or horovodrun --mpi), or use topology='sharded', which also "
                         "spreads the server work, over Horovod's own collectives")


def _check_op(op, predivide: float, algorithm: str) -> bool:
    """True for a sum, False for an average; Adasum and anything else are refused."""
    if op is None:
        return False
    try:
        import horovod.torch as hvd  # optional here: the simulator runs without Horovod
        average, total, adasum = hvd.Average, hvd.Sum, hvd.Adasum
    except ImportError:  # pragma: no cover - Horovod is installed with hvd_qadam
        average, total, adasum = 0, 1, 2
    if op == adasum:
        raise ValueError("op=hvd.Adasum is not supported: Adasum combines full-precision gradients pairwise; "
                         "use op=hvd.Average")
    if op not in (average, total):
        raise ValueError(f"op must be hvd.Average or hvd.Sum, got {op!r}")
    if predivide != 1.0 and op != average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if op == total and ALGORITHMS[algorithm].output != OUT_GRAD:
        raise ValueError(f"op=hvd.Sum sums gradients; algorithm {algorithm!r} exchanges updates or weights, "
                         f"which are averaged")
    return op == total


def _quantizer_from_compression(compression) -> str:
    """Horovod's compression argument -> our uplink quantizer (the default one for ``none``)."""
    if compression is None:
        return "qsgdinf"
    return quantizer_of(compression) or "qsgdinf"


def _process_set(process_set):
    if process_set is None:
        return None
    import horovod.torch as hvd  # optional: only a process set brings Horovod here
    return None if process_set is hvd.global_process_set else process_set


def _bucket_size_for(quantizer: str, *given):
    """The first bucket size the caller gave (None: not given; a bad one such as 0 goes on to
    LinkSpec, which refuses it), else None: the quantizer's default (QuantizerKind.default_bucket_size)."""
    return next((size for size in given if size is not None), None)
