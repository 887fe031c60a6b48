"""The ``ps`` topology: a dedicated parameter-server rank over mpi4py.

Launch N workers plus one server with MPI (``mpirun -np N+1 ...``, or ``horovodrun -np N+1`` with
its MPI controller) and replace ``hvd.init()`` by ``hvd_qadam.ps_init()``:

    import hvd_qadam
    hvd_qadam.ps_init()          # the last rank serves here until the workers are done, then exits
    ...                           # the rest of the Horovod script, unchanged; hvd.size() == N
    opt = hvd_qadam.DistributedOptimizer(opt, model.named_parameters(), topology="ps", ...)

Workers run Horovod on a communicator without the server. Each step every worker sends its frame
point-to-point to the server, which averages, runs the server transform (server Adam, server EF),
and sends the downlink frame back. The server learns the model from the workers' first message
(names, shapes, configuration, initial weights) and keeps its own copy of the weights.
"""
from __future__ import annotations

import atexit
import os
import sys
import time

import torch

from . import codec
from .algorithms import OUT_UPDATE, OUT_WEIGHTS
from .comm import collective_timeout
from .engine import Engine
from .errors import CommError, ConsistencyError
from .layout import Layout
from .quant.backend import share_cores
from .statekey import StateKey

TAG = 7411
TIMEOUT_ENV = "HVD_QADAM_PS_TIMEOUT"

_worker_comm = None


def _timeout() -> float:
    return float(os.environ[TIMEOUT_ENV]) if TIMEOUT_ENV in os.environ else collective_timeout()


def _recv(comm, source, what: str):
    """Receive a pickled message, giving up after the timeout (so a lost peer cannot hang us)."""
    from mpi4py import MPI  # optional: only ps launches need it, and importing it starts MPI
    deadline = time.monotonic() + _timeout()
    status = MPI.Status()
    while True:
        msg = comm.improbe(source=source, tag=TAG, status=status)
        if msg is not None:
            return msg.recv(), status.Get_source()
        if time.monotonic() > deadline:
            raise CommError(f"no message from {what} within {_timeout():.0f} s ({TIMEOUT_ENV}); a rank died or hangs")
        time.sleep(0.0002)


class PSWorkerComm:
    """A worker's view: collectives among the workers, requests to the server rank."""

    def __init__(self, worker_comm, ps_comm, server: int):
        self.worker_comm, self.ps_comm, self.server = worker_comm, ps_comm, server
        self.rank, self.size = worker_comm.Get_rank(), worker_comm.Get_size()
        self._said_hello = False

    def allgather_object(self, obj, name: str = "") -> list:
        return self.worker_comm.allgather(obj)

    def ps_request(self, message):
        self.ps_comm.send(message, dest=self.server, tag=TAG)
        reply, _ = _recv(self.ps_comm, self.server, "the parameter server")
        return reply

    def hello(self, engine, params: dict) -> None:
        """First step: describe the model to the server (it checks all workers agree)."""
        if self._said_hello:
            return
        layout = engine.layout
        groups = []
        for gi, pg in enumerate(engine.hyper_groups()):
            names = layout.names_by_group[gi]
            groups.append({"names": names, "hyper": {k: v for k, v in pg.items() if k != "params"}})
        meta = {"config": engine.cfg, "signature": layout.signature, "groups": groups,
                "params": {n: t.detach().cpu().clone() for n, t in params.items()}}
        status, reply = self.ps_request(("hello", meta))
        if status != "ok":
            raise ConsistencyError(f"parameter server: {reply}")
        self._said_hello = True

    def bye(self) -> None:
        try:
            self.ps_comm.send(("bye",), dest=self.server, tag=TAG)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def ps_worker_comm() -> PSWorkerComm:
    if _worker_comm is None:
        raise RuntimeError("topology='ps' needs hvd_qadam.ps_init() at the start of the script (instead of "
                           "hvd.init()), launched with mpirun (or horovodrun with its MPI controller)")
    return _worker_comm


def ps_init(server_rank: int | None = None):
    """Split the MPI world into workers and one server rank (default: the last rank).

    On the server rank this serves until every worker has finished, then exits the process. On the
    workers it initialises Horovod on the workers' communicator and returns that communicator.
    """
    global _worker_comm
    try:
        from mpi4py import MPI  # optional: only ps launches need it, and importing it starts MPI
    except ImportError as e:
        raise RuntimeError("topology='ps' needs mpi4py (pip install mpi4py) and an MPI launch") from e
    world = MPI.COMM_WORLD
    if world.Get_size() < 2:
        gloo = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") or os.environ.get("HOROVOD_CONTROLLER") == "gloo"
        raise RuntimeError(
            "topology='ps' needs at least 2 MPI processes (workers + 1 server) launched by mpirun, or by "
            "horovodrun with its MPI controller" + (": under Gloo (horovodrun --gloo) mpi4py sees a single "
                                                     "process, so there is no server rank to talk to" if gloo else
                                                     f"; this MPI world has {world.Get_size()} process"))
    server = world.Get_size() - 1 if server_rank is None else server_rank
    is_server = world.Get_rank() == server
    worker_comm = world.Split(MPI.UNDEFINED if is_server else 1, world.Get_rank())
    ps_comm = world.Dup()
    share_cores(world.Split_type(MPI.COMM_TYPE_SHARED).Get_size())   # ranks on this host, server included
    if is_server:
        code = 0
        try:
            ParameterServer(ps_comm, [r for r in range(world.Get_size()) if r != server]).serve()
        except BaseException as e:  # noqa: BLE001
            print(f"hvd_qadam parameter server (rank {server}) failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            code = 1
            world.Abort(1)
        sys.exit(code)
    import horovod.torch as hvd  # not on the server rank, which never returns from above
    hvd.init(comm=worker_comm)
    _worker_comm = PSWorkerComm(worker_comm, ps_comm, server)
    atexit.register(_worker_comm.bye)
    return worker_comm


class _ServerComm:
    def __init__(self, n_workers: int):
        self.rank, self.size = n_workers, n_workers

    def allgather_object(self, obj, name=""):
        raise RuntimeError("the parameter server does not take part in worker collectives")


class ParameterServer:
    """Aggregates, steps and answers: the server rank of ``ps``, running the server side of an
    :class:`~hvd_qadam.engine.Engine` (:meth:`step`) on its own copy of the parameters."""

    def __init__(self, comm, workers: list):
        self.comm, self.workers = comm, workers
        self.engine = None
        self.params = None
        self.hyper = []

    def _reply_all(self, reply) -> None:
        for w in self.workers:
            self.comm.send(reply, dest=w, tag=TAG)

    def _setup(self, metas: dict):
        first = metas[self.workers[0]]
        for w, m in metas.items():
            if m["signature"] != first["signature"] or m["config"] != first["config"]:
                return f"worker {w} has a different model or configuration than worker {self.workers[0]}"
        self.params = {n: t.clone() for n, t in first["params"].items()}
        param_groups = [{"params": [self.params[n] for n in g["names"]], **g["hyper"]} for g in first["groups"]]
        for pg in param_groups:
            for p in pg["params"]:
                p.requires_grad_(True)
        names = {p: n for n, p in self.params.items()}
        layout = Layout(param_groups, names, first["config"].min_compress_numel,
                        first["config"].fusion_threshold_bytes, exact_float64=first["config"].exact_float64,
                        passthrough_wire=first["config"].passthrough_wire)
        if layout.signature != first["signature"]:
            return "the server could not rebuild the workers' parameter layout"
        self.hyper = [g["hyper"] for g in first["groups"]]
        self.engine = Engine(first["config"], layout, _ServerComm(len(self.workers)), lambda i: self.hyper[i])
        # as every worker's engine starts before its first step: the algorithm's state that starts
        # from the weights (local SGD's anchors, which the server's side of the step reads too)
        self.engine.start(self.params)
        return None

    def step(self, frames_data: list):
        """One step from the workers' frames. Returns (status, reply) where reply is the downlink
        frame for status "ok", else an error message. The server's copy of the parameters is
        updated the way the workers update theirs."""
        eng, params = self.engine, self.params
        frames = eng.parse(frames_data, "uplink")
        errors = [f.error for f in frames if f.error is not None]
        if errors:
            return "nonfinite", "; ".join(errors)
        try:
            for src, f in enumerate(frames):
                eng.check_frame(src, f, "uplink frame")
        except ConsistencyError as e:
            return "consistency", str(e)
        st = eng.begin()
        eng.set_params_source(lambda g: [params[s.name] for s in g.slots])
        try:
            down = [eng.serve(g, 0, g.numel, [f.payloads[g.index] for f in frames], st) for g in eng.layout.groups]
            values = []
            for g, q in zip(eng.layout.groups, down):
                v = eng.scratch(StateKey.worker(g.index, "down"), g.numel, g.device, g.dtype)
                codec.decode_into(q, v)
                values.append(eng.alg.finish(eng, g, v, st))
        except BaseException:
            eng.abort()
            raise
        eng.commit(st)
        with torch.no_grad():
            for g, value in zip(eng.layout.groups, values):
                for name, v in g.views(value).items():
                    if eng.kind == OUT_UPDATE:
                        params[name].sub_(v.to(params[name].dtype))
                    elif eng.kind == OUT_WEIGHTS and not eng.alg.steps_locally:
                        params[name].copy_(v)
        return "ok", eng.frame(down, None)

    def _checkpoint(self, kind: str, msg) -> tuple:
        """(status, value) for a "state" or "load" request: a request the server cannot honour
        (before the workers' first step, a checkpoint of another model) is answered with an
        error for the worker to raise, instead of ending the server."""
        if self.engine is None:
            return "error", f"{kind!r} before the workers' first step: the server has no model yet"
        try:
            if kind == "state":
                return "ok", {"engine": self.engine.state_dict(),
                              "params": {n: t.clone() for n, t in self.params.items()}}
            if set(self.params) != set(msg[1]["params"]):
                return "error", "the checkpoint's parameters are not this model's"
            self.engine.load_state_dict(msg[1]["engine"])
            self.engine.alg.restore(self.engine)
            for n, t in msg[1]["params"].items():
                self.params[n].data.copy_(t)
            return "ok", None
        except (ConsistencyError, ValueError, KeyError, RuntimeError) as e:
            return "error", f"{type(e).__name__}: {e}"

    def serve(self) -> None:
        pending_hello, pending_steps, done = {}, {}, set()
        gone = None          # set once a worker left: every later step is answered with an error
        while len(done) < len(self.workers):
            msg, src = _recv(self.comm, source=_any_source(), what="any worker")
            kind = msg[0]
            if kind == "bye":
                done.add(src)
                if gone is None:
                    gone = f"worker rank {src} exited; the parameter server cannot complete steps without it"
                for w in list(pending_steps):
                    self.comm.send(("error", gone), dest=w, tag=TAG)
                pending_steps = {}
            elif kind == "step" and gone is not None:
                self.comm.send(("error", gone), dest=src, tag=TAG)
            elif kind == "hello":
                pending_hello[src] = msg[1]
                if len(pending_hello) == len(self.workers):
                    err = self._setup(pending_hello)
                    self._reply_all(("error", err) if err else ("ok", None))
                    pending_hello = {}
            elif kind == "step":
                pending_steps[src] = msg
                if len(pending_steps) == len(self.workers):
                    frames = [pending_steps[w][1] for w in self.workers]
                    self.hyper = pending_steps[self.workers[0]][2]
                    with torch.no_grad():
                        reply = self.step(frames)
                    self._reply_all(reply)
                    pending_steps = {}
            elif kind in ("state", "load"):
                self.comm.send(self._checkpoint(kind, msg), dest=src, tag=TAG)
            else:
                raise RuntimeError(f"unknown request {kind!r} from rank {src}")


def _any_source() -> int:
    from mpi4py import MPI  # optional: only ps launches need it, and importing it starts MPI
    return MPI.ANY_SOURCE
