"""Runs on every rank under mpirun: trains the digits MLP with hvd_qadam for a few steps and saves
rank 0's final parameters (plus a hash of every rank's) for the test to compare with the simulator."""
import argparse
import hashlib
import json
import os
import sys

from mpi4py import MPI  # first: mpi4py owns MPI (thread level multiple), Horovod joins it

import horovod.torch as hvd
import torch

import hvd_qadam

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import digits  # noqa: E402 - scripts/digits.py

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--kwargs", default="{}", help="JSON of DistributedOptimizer keyword arguments")
parser.add_argument("--base", default="adam", choices=["adam", "sgd"])
parser.add_argument("--float64", action="store_true", help="model and inputs in float64")
args = parser.parse_args()

torch.set_num_threads(1)
hvd.init(comm=MPI.COMM_WORLD)
kwargs = json.loads(args.kwargs)


def make_optimizer(model):
    return hvd_qadam.DistributedOptimizer(digits.base_optimizer(model, args.base), model.named_parameters(), **kwargs)


model, _ = digits.train(hvd.rank(), hvd.size(), make_optimizer, epochs=100, max_steps=args.steps,
                        dtype=torch.float64 if args.float64 else torch.float32)
params = {n: p.detach().clone() for n, p in model.named_parameters()}
digest = hashlib.sha256(b"".join(p.numpy().tobytes() for p in params.values())).hexdigest()
digests = hvd.allgather_object(digest)
if hvd.rank() == 0:
    torch.save({"params": params, "digests": digests, "size": hvd.size()}, args.out)
hvd.shutdown()
sys.exit(0)
