"""Runs under mpirun with N workers + 1 server rank (the last): the ps topology."""
import argparse
import hashlib
import json
import os
import sys

from mpi4py import MPI  # noqa: F401 - imported first so mpi4py owns MPI

import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from harness import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--kwargs", default="{}")
parser.add_argument("--base", default="adam", choices=["adam", "sgd"])
parser.add_argument("--float64", action="store_true", help="model and inputs in float64")
parser.add_argument("--checkpoint-at", type=int, default=0, help="save, rebuild and reload at this step")
args = parser.parse_args()
torch.set_num_threads(1)

hvd_qadam.ps_init()            # the server rank never returns from here
import horovod.torch as hvd    # noqa: E402

kwargs = dict(json.loads(args.kwargs), topology="ps")


def make_optimizer(model):
    return hvd_qadam.DistributedOptimizer(digits.base_optimizer(model, args.base), model.named_parameters(), **kwargs)


holder = {}


def on_step(step, opt):
    holder["opt"] = opt
    if step == args.checkpoint_at:
        holder["state"] = opt.state_dict()


model, _ = digits.train(hvd.rank(), hvd.size(), make_optimizer, epochs=100, max_steps=args.steps,
                        dtype=torch.float64 if args.float64 else torch.float32, on_step=on_step)
params = {n: p.detach().clone() for n, p in model.named_parameters()}
digest = hashlib.sha256(b"".join(p.numpy().tobytes() for p in params.values())).hexdigest()
digests = hvd.allgather_object(digest)
out = {"params": params, "digests": digests, "size": hvd.size(),
       "stats": vars(holder["opt"].communication_stats) if "opt" in holder else None}
if "state" in holder:
    out["has_server_state"] = "ps_server" in holder["state"]["hvd_qadam"]
if hvd.rank() == 0:
    torch.save(out, args.out)
hvd.shutdown()
