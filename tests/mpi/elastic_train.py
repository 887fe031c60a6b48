"""Horovod Elastic training of a tiny MLP, run by ``horovodrun --min-np 2 --max-np 3
--host-discovery-script ...`` (see tests/test_elastic.py).

The resizes are driven by this script so that they happen at fixed steps, whatever the speed of the
machine: at each step of ``--schedule`` (``STEP:SLOTS,...``) rank 0 writes the slot count into
``--slots-file`` (which the discovery script prints), every rank commits, and all of them call
``state.check_host_updates()`` until Horovod's driver announces the change (HostsUpdatedInterrupt:
the elastic loop resets and every rank, old and new, carries on from the commit). ``--die-at STEP``
makes the last rank exit in the middle of that step's exchange, once: the others must get
HorovodInternalError from ``optimizer.step()`` (logged as an "error" event) and roll back to the
last commit; Horovod's driver starts a replacement.

The global batch of a step is the same in every world (30 samples, split over 2 or 3 ranks), so
the run is comparable with the same schedule under ``hvd.DistributedOptimizer``. Rank 0 appends
one JSON line per event to ``--events-file``: after every (re)start and on the two steps after it, whether
every replica's weights are identical, the world size, the step and the full-data loss.
"""
import argparse
import hashlib
import json
import os
import time

import horovod.torch as hvd
import torch

import hvd_qadam

parser = argparse.ArgumentParser()
parser.add_argument("--impl", choices=["horovod", "hvd_qadam"], default="hvd_qadam")
parser.add_argument("--state", choices=["keep", "reset"], default="keep",
                    help="hvd_qadam: keep the compression state through resizes, or drop residuals and server "
                         "state at every reset (the comparison)")
parser.add_argument("--qadam-kwargs", default="{}", help="DistributedOptimizer keyword arguments, JSON")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--schedule", default="30:3,70:2", help="STEP:SLOTS,...")
parser.add_argument("--slots-file", required=True)
parser.add_argument("--commit-every", type=int, default=10)
parser.add_argument("--events-file", required=True)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--extra-host", default="localhost",
                    help="slots beyond the first 2 are on this host name (127.0.0.1: another host for Horovod's "
                         "driver, so that a failed worker's host can be blacklisted without the first 2 slots)")
parser.add_argument("--die-at", type=int, default=None,
                    help="the last rank exits in the middle of this step's exchange, once (a failure)")
parser.add_argument("--die-marker", default=None, help="file that says the failure happened already")
parser.add_argument("--wait", type=float, default=90, help="seconds to wait for the driver to announce a resize")
args = parser.parse_args()

torch.set_num_threads(1)
hvd.init()

# Synthetic regression: a fixed random teacher plus noise; the same data on every rank.
gen = torch.Generator().manual_seed(0)
X = torch.randn(600, 16, generator=gen)
teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
for p in teacher.parameters():
    p.data = torch.randn(p.shape, generator=gen)
with torch.no_grad():
    Y = teacher(X) + 0.3 * torch.randn(600, 4, generator=gen)
GLOBAL_BATCH = 30

torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                            torch.nn.Linear(64, 4))
base = torch.optim.Adam(model.parameters(), lr=args.lr)
if args.impl == "horovod":
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
else:
    kwargs = {"algorithm": "qadam", "topology": "sharded", "min_compress_numel": 256}
    kwargs.update(json.loads(args.qadam_kwargs))
    opt = hvd_qadam.DistributedOptimizer(base, named_parameters=model.named_parameters(), **kwargs)
schedule = {int(s): int(n) for s, n in (item.split(":") for item in args.schedule.split(",") if item)}
state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0)


def hosts_spec(slots: int) -> str:
    """What the discovery script prints for ``slots`` slots: 2 on localhost, the rest on --extra-host."""
    if args.extra_host == "localhost" or slots <= 2:
        return f"localhost:{slots}\n"
    return f"localhost:2\n{args.extra_host}:{slots - 2}\n"


def drop_compression_state():
    """--state reset: what a world-size change did to hvd_qadam's state before it was elastic."""
    eng = opt.engine
    eng.bank.clear(lambda k: k.is_server_state or k.is_residual)
    eng.counters["server_adam_step"] = {}
    opt._committed_server = None


if args.impl == "hvd_qadam" and args.state == "reset":
    state.register_reset_callbacks([drop_compression_state])


def full_loss() -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(X), Y))


def report(event: str) -> None:
    """Every rank: a digest of its weights; rank 0 logs whether they are all identical."""
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = hvd.allgather_object(digest)
    if hvd.rank() == 0:
        with open(args.events_file, "a") as f:
            f.write(json.dumps({"event": event, "step": state.step, "size": hvd.size(),
                                "identical": len(set(digests)) == 1, "digest": digests[0], "loss": full_loss(),
                                "time": time.time()}) + "\n")


def wait_for_resize() -> None:
    """Commit, then poll the driver's announcement (a collective: every rank raises together)."""
    state.commit()
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.25)
        state.check_host_updates()
    raise RuntimeError(f"no resize announced within {args.wait} s of step {state.step}")


@hvd.elastic.run
def train(state):
    report("start")
    since = 0
    while state.step < args.steps:
        s = state.step
        idx = torch.arange(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH) % len(X)
        per = GLOBAL_BATCH // hvd.size()
        i = idx[hvd.rank() * per:(hvd.rank() + 1) * per]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[i]), Y[i]).backward()   # starts the exchange (hooks)
        if s == args.die_at and hvd.rank() == hvd.size() - 1 and not os.path.exists(args.die_marker):
            open(args.die_marker, "w").close()
            os._exit(1)            # the others are waiting for this rank's payloads now
        t0 = time.monotonic()
        try:
            opt.step()
        except Exception as e:
            if hvd.rank() == 0:
                with open(args.events_file, "a") as f:
                    f.write(json.dumps({"event": "error", "step": s, "size": hvd.size(), "type": type(e).__name__,
                                        "seconds": time.monotonic() - t0, "message": str(e)[:300]}) + "\n")
            raise
        state.step += 1
        since += 1
        if since <= 2:
            report("after_start")
        if state.step in schedule and hvd.size() != schedule[state.step]:
            if hvd.rank() == 0:
                with open(args.slots_file, "w") as f:
                    f.write(hosts_spec(schedule[state.step]))
            wait_for_resize()
        elif state.step % args.commit_every == 0:
            state.commit()
    report("end")
    if hvd.rank() == 0 and args.impl == "hvd_qadam":
        with open(args.events_file, "a") as f:
            f.write(json.dumps({"event": "resets", "resets": opt.elastic_resets}) + "\n")


train(state)
