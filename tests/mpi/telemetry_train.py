"""Runs on every rank under mpirun: trains the digits MLP with hvd_qadam and telemetry on (every
rank is given the same log path; only rank 0 may write it), and saves, from every rank, the bytes
its optimizer's communication_stats reported at each step, for the test to compare with the log."""
import argparse
import json
import os
import sys

from mpi4py import MPI  # first: mpi4py owns MPI (thread level multiple), Horovod joins it

import horovod.torch as hvd
import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from harness import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--log", required=True, help="the telemetry log (every rank passes the same)")
parser.add_argument("--out", required=True, help="per-rank stats: <out>.<rank>.json")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

torch.set_num_threads(1)
hvd.init(comm=MPI.COMM_WORLD)
seen = []


def make_optimizer(model):
    return hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), telemetry=args.log)


def on_step(step, opt):
    s = opt.communication_stats
    seen.append({"step": s.step, "sent_bytes": s.sent_bytes, "received_bytes": s.received_bytes,
                 "fp32_bytes": s.fp32_bytes, "totals": dict(s.totals)})


model, _ = digits.train(hvd.rank(), hvd.size(), make_optimizer, epochs=100, max_steps=args.steps, on_step=on_step)
with open(f"{args.out}.{hvd.rank()}.json", "w") as f:
    json.dump(seen, f)
hvd.shutdown()
sys.exit(0)
