"""Horovod Elastic with hvd_qadam: ``hvd.elastic.TorchState(model=..., optimizer=...)`` keeps the
compression state consistent through ``commit()``, ``restore()``, ``sync()`` and every resize.

Horovod's elastic loop (``hvd.elastic.run``) handles two events:

* a failure (a peer died, or a collective was interrupted): ``HorovodInternalError`` ->
  ``state.restore()`` (every surviving rank goes back to its last commit) -> ``hvd.shutdown();
  hvd.init()`` on the new world -> ``state.sync()`` (rank 0's state to everyone);
* hosts added or removed (``HostsUpdatedInterrupt``, raised by ``state.commit()``): the live state
  is kept -> reset -> ``state.sync()``, skipped when hosts were only removed.

hvd_qadam's state is of three kinds, and each is carried through these events by its own rule:

* **per-rank worker state**: the worker error-feedback residual e_i (rank i's gradient mass not yet
  sent), Efficient-Adam's worker moments, EF-SGD's momentum buffer. A rank that survives keeps its
  own (the residual is its own unsent mass; it is restored with its commit after a failure). A rank
  that joins starts with residual 0 (it has sent nothing yet) and takes rank 0's moments or
  momentum as its starting point. A departed rank's residual is lost with it: it is at most one
  quantization error per element of that rank's uplink, and no other rank can send it.
* **replicated state** (identical on every rank): step counters, 1-bit Adam's m and v, local SGD's
  anchors, learned quantization levels, and the whole server side under ``allgather``: every rank
  keeps its own; a joining rank takes rank 0's in ``sync()``.
* **sharded server state** (``topology="sharded"``: server residuals e_s, server moments m/v,
  latent weights, one shard per rank): re-partitioned over the new world. At every ``commit()``
  the shards are gathered (one allgather of the server state), so every rank's commit holds the
  whole server state; after a resize the new shards are cut from the live shards where every
  shard survived (hosts added), else from a committed copy at the same step (after a failure, or
  hosts removed). Only if neither exists (a resize at a step that was not committed, a rank lost)
  is the server state reset, with a warning.

A rollback (``restore()``) restores exactly the committed state: the bank of residuals and
moments, the counters and the learned levels are copies taken at ``commit()``.

Every rank, old and new, re-enters the first-step consistency handshake after a reset (the
optimizer's ``_start``), so the ranks agree again on model, configuration and step before the
first exchange. The handshake reads the new rank and size from Horovod.
"""
from __future__ import annotations

import abc
import copy
import warnings

import torch

from .engine import STATE_KEY
from .statekey import RESIDUAL, StateKey

COMMITTED_KEY = "elastic_server"      # the committed whole server state in an elastic save


class QuantizedOptimizer(abc.ABC):
    """Virtual base class of every ``hvd_qadam.DistributedOptimizer`` (they are dynamic subclasses
    of the wrapped optimizer's class); it selects :class:`QuantizedOptimizerStateHandler` in
    ``hvd.elastic.TorchState``."""


# ----------------------------------------------------------------------------- server state

def server_pieces(engine) -> dict:
    """This rank's server state as self-describing pieces: {(group, start, kind): tensor} (copies)
    and the server Adam step of each group it serves."""
    pieces = {(k.group, k.shard, k.kind): v.detach().cpu().clone()
              for k, v in engine.bank.items() if k.is_server_state}
    steps = {}
    for name, t in engine.counters["server_adam_step"].items():
        k = StateKey.parse(name)
        if k.is_server_state:
            steps[k.group] = int(t)
    return {"pieces": pieces, "adam_step": steps}


def piece_summary(pieces: dict) -> list:
    """[(group, start, stop, kind)] of some pieces: what they cover, without their values."""
    return sorted((g, a, a + t.numel(), s) for (g, a, s), t in pieces.items())


def covers(summaries: list, layout) -> bool:
    """Whether the union of the pieces of ``summaries`` covers every element of every (group,
    kind) that appears in any of them."""
    spans = {}
    for summary in summaries:
        for g, a, b, s in summary:
            spans.setdefault((g, s), []).append((a, b))
    for (g, _), ranges in spans.items():
        end = 0
        for a, b in sorted(ranges):
            if a > end:
                return False
            end = max(end, b)
        if end < layout.groups[g].numel:
            return False
    return True


def assemble(parts: list, layout, step: int) -> dict:
    """The whole server state from the pieces of every rank (``server_pieces`` results):
    {"step", "values": {(group, kind): full vector}, "adam_step": {group: t}, "complete"}."""
    values, adam_step, summaries = {}, {}, []
    for part in parts:
        summaries.append(piece_summary(part["pieces"]))
        for (g, a, s), t in part["pieces"].items():
            full = values.get((g, s))
            if full is None:
                full = values[(g, s)] = torch.zeros(layout.groups[g].numel, dtype=t.dtype)
            full[a:a + t.numel()].copy_(t)
        for g, t in part["adam_step"].items():
            adam_step[g] = max(t, adam_step.get(g, 0))
    return {"step": int(step), "values": values, "adam_step": adam_step, "complete": covers(summaries, layout)}


def install(engine, whole: dict | None) -> None:
    """Replace this rank's server state by its shard of ``whole`` (None: no server state, a reset).

    Server residuals (kind ``e``) exist only for a quantized downlink; where the topology now
    runs a full-precision one (``topology="auto"`` went from ``sharded`` to ``allgather`` at a
    shrink) they are dropped, with a warning: at most one downlink quantization error per element."""
    engine.bank.clear(lambda k: k.is_server_state)
    engine.counters["server_adam_step"] = {}
    if whole is None:
        return
    full_downlink = engine.cfg.downlink.passthrough
    dropped = [full for (_, s), full in whole["values"].items() if s == RESIDUAL and full_downlink]
    if any(bool(full.any()) for full in dropped):
        warnings.warn(f"topology {engine.cfg.topology!r} runs a full-precision downlink in this world: the server "
                      f"error-feedback residuals of the previous world's quantized downlink are dropped (at most "
                      f"one downlink quantization error per element)", RuntimeWarning, stacklevel=3)
    for (g, s), full in whole["values"].items():
        if s == RESIDUAL and full_downlink:
            continue
        a, b = engine.served_range(engine.layout.groups[g])
        device = engine.layout.groups[g].device
        engine.bank.set(StateKey.server(g, a, s), full[a:b].to(device).clone())
    for g, t in whole["adam_step"].items():
        a, _ = engine.served_range(engine.layout.groups[g])
        engine.counters["server_adam_step"][StateKey.server(g, a).name] = t


def _sharded(engine) -> bool:
    return any(len(b) > 1 for b in engine.bounds.values())


def committed_server_state(opt) -> dict:
    """The whole server state at this step, for a commit. Collective (one allgather) when the
    server state is sharded over more than one rank and the optimizer is running; before the
    first step after a reset it is the copy that reset brought, or what this rank holds."""
    eng = opt._engine
    held = opt._committed_server
    if not opt._started:
        if held is not None and held["step"] == eng.step_count:
            return held
        # Only this rank's pieces: whole only where the server state is not sharded.
        whole = assemble([server_pieces(eng)], eng.layout, eng.step_count)
        whole["complete"] = whole["complete"] and not _sharded(eng) and bool(whole["values"] or not eng.step_count)
        return whole
    mine = server_pieces(eng)
    parts = (opt._comm.allgather_object(mine, name="hvd_qadam.elastic.commit")
             if _sharded(eng) and eng.size > 1 else [mine])
    return assemble(parts, eng.layout, eng.step_count)


def reshard_summary(opt) -> dict:
    """What this rank can contribute to re-partitioning the server state (for the handshake)."""
    eng = opt._engine
    held = opt._committed_server
    return {"reshard": bool(opt._reshard), "step": eng.step_count,
            "pieces": piece_summary(server_pieces(eng)["pieces"]),
            "committed": bool(held is not None and held["complete"] and held["step"] == eng.step_count)}


def reshard(opt, everyone: list) -> str:
    """Re-partition the server state over the current world (collective; every rank calls it with
    the same handshake results). Returns how: "live", "committed", "none" (nothing to move) or
    "reset"."""
    eng = opt._engine
    infos = [e["elastic"] for e in everyone]
    step = infos[0]["step"]
    live = [i["pieces"] for i in infos if i["step"] == step]
    if not any(live):
        install(eng, None)
        return "none"
    if covers(live, eng.layout):
        # Each rank sends only pieces no lower rank holds (under allgather one copy, rank 0's).
        seen, needed = set(), []
        for i in infos:
            new = i["step"] == step and not set(map(tuple, i["pieces"])) <= seen
            seen |= set(map(tuple, i["pieces"])) if i["step"] == step else set()
            needed.append(new)
        mine = server_pieces(eng) if needed[eng.rank] else {"pieces": {}, "adam_step": {}}
        parts = opt._comm.allgather_object(mine, name="hvd_qadam.elastic.reshard")
        install(eng, assemble(parts, eng.layout, step))
        return "live"
    donor = next((r for r, i in enumerate(infos) if i["committed"] and i["step"] == step), None)
    if donor is not None:
        held = opt._committed_server if eng.rank == donor else None
        whole = opt._comm.allgather_object(held, name="hvd_qadam.elastic.reshard")[donor]
        install(eng, whole)
        return "committed"
    warnings.warn(f"the server state sharded over the previous world cannot be rebuilt at step {step} (a rank "
                  f"left and no commit holds this step): server residuals and moments are reset. Commit "
                  f"(state.commit()) before resizing to keep them", RuntimeWarning, stacklevel=3)
    install(eng, None)
    return "reset"


# ----------------------------------------------------------------------------- save / restore / sync

def elastic_state_dict(opt) -> dict:
    """A commit: the optimizer's state_dict (copies) with the whole server state."""
    opt._check_world()
    sd = copy.deepcopy(super(opt.__class__, opt).state_dict())
    sd[STATE_KEY] = opt._engine.state_dict()
    whole = committed_server_state(opt)
    sd[STATE_KEY][COMMITTED_KEY] = whole
    opt._committed_server = whole
    return sd


def load_elastic_state_dict(opt, saved: dict) -> None:
    """A rollback to ``saved`` (an :func:`elastic_state_dict`): exactly the committed state. This
    rank's own shards of the old world are kept as pieces until the next step re-partitions."""
    saved = copy.deepcopy(saved)
    ours = saved.pop(STATE_KEY)
    whole = ours.pop(COMMITTED_KEY, None)
    super(opt.__class__, opt).load_state_dict(saved)
    eng = opt._engine
    # The commit is this rank's own, in the world it was taken in: none of the world-size or
    # foreign-rank checks of a checkpoint load apply.
    ours = dict(ours, world_size=eng.size, rank=eng.rank, config=dict(ours["config"], topology=eng.cfg.topology))
    _load(opt, ours, whole)
    _restart(opt)


def sync_from_root(opt) -> None:
    """After ``hvd.broadcast_optimizer_state``: a rank that is not at rank 0's step (it joined, or
    its commit is older) takes rank 0's hvd_qadam state, except the residuals (zero: it has sent
    nothing) and the server shards (re-partitioned at the next step). Collective."""
    import horovod.torch as hvd  # optional: elastic runs only under Horovod
    eng = opt._engine
    opt._comm.refresh_world()
    root = None
    if hvd.rank() == 0:
        sd = eng.state_dict()
        sd["state"] = {k: v for k, v in sd["state"].items()
                       if not (StateKey.parse(k).is_server_state or StateKey.parse(k).is_residual)}
        root = {"step": eng.step_count, "state": sd}
    root = hvd.broadcast_object(root, root_rank=0, name="hvd_qadam.elastic.sync")
    if eng.step_count != root["step"]:
        # rank 0's state may come from the previous world's topology (``auto`` chooses again for
        # this world at the next step, on every rank); it holds no sharded state to check.
        state = root["state"]
        _load(opt, dict(state, world_size=eng.size, rank=eng.rank,
                        config=dict(state["config"], topology=eng.cfg.topology)), None)
    _restart(opt)


def _load(opt, engine_state: dict, committed_server) -> None:
    """Load ``engine_state`` into the optimizer's engine as this rank's own (no checkpoint
    checks apply), with ``committed_server`` as the last commit's whole server state."""
    eng = opt._engine
    eng.load_state_dict(engine_state)
    eng.alg.restore(eng)
    opt._committed_server = committed_server


def _restart(opt) -> None:
    """After a rollback or a sync: the next step starts over with the handshake, which
    re-partitions the server state over the current world."""
    opt._reset_round()
    opt._started = False
    opt._reshard = True


def _handler_base():
    from horovod.torch.elastic.state import OptimizerStateHandler  # optional: Horovod's elastic module
    return OptimizerStateHandler


def register_state_handler() -> None:
    """Put :class:`QuantizedOptimizerStateHandler` first in TorchState's handler registry (once)."""
    try:
        from horovod.torch.elastic import state as hvd_state  # optional: Horovod's elastic module
    except ImportError:  # pragma: no cover - Horovod without its elastic module
        return
    registry = hvd_state.get_handler_registry()
    if any(cls is QuantizedOptimizer for cls, _ in registry):
        return
    hvd_state.set_handler_registry([(QuantizedOptimizer, _make_handler_class())] + list(registry))


_HANDLER = []


def _make_handler_class():
    if _HANDLER:
        return _HANDLER[0]

    class QuantizedOptimizerStateHandler(_handler_base()):
        """TorchState's handler for an hvd_qadam optimizer: the commit also holds the whole
        server state (gathered: ``save`` is collective, like ``commit`` itself), restore is an
        exact rollback, sync adds hvd_qadam's state to Horovod's broadcast of the optimizer state."""

        def __init__(self, optimizer):      # not collective: TorchState is built on one rank at a time
            self.value = optimizer
            self._saved_optimizer_state = None
            self._saved_optimizer_state = self._local_save()

        def _local_save(self):
            opt = self.value
            sd = copy.deepcopy(super(opt.__class__, opt).state_dict())
            sd[STATE_KEY] = opt._engine.state_dict()
            sd[STATE_KEY][COMMITTED_KEY] = opt._committed_server
            return sd

        def save(self):
            self._saved_optimizer_state = elastic_state_dict(self.value)

        def restore(self):
            load_elastic_state_dict(self.value, self._saved_optimizer_state)

        def sync(self):
            from horovod.torch.functions import broadcast_optimizer_state  # optional: Horovod
            broadcast_optimizer_state(self.value, root_rank=0)
            sync_from_root(self.value)

    _HANDLER.append(QuantizedOptimizerStateHandler)
    return QuantizedOptimizerStateHandler
