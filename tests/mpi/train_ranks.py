"""Runs on every rank under mpirun: trains the digits MLP with hvd_qadam for a few steps and saves
rank 0's final parameters (plus a hash of every rank's) for the test to compare with the simulator,
the last epoch's loss and the last step's bytes (``--horovod``: Horovod's own optimizer instead)."""
import argparse
import hashlib
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
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--kwargs", default="{}", help="JSON of DistributedOptimizer keyword arguments")
parser.add_argument("--base", default="adam", choices=["adam", "sgd"])
parser.add_argument("--float64", action="store_true", help="model and inputs in float64")
parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default=None,
                    help="model and inputs in this dtype")
parser.add_argument("--horovod", action="store_true", help="hvd.DistributedOptimizer (fp32 allreduce)")
parser.add_argument("--device", default="cpu", help="of the model and inputs (cuda: every rank on the current "
                    "GPU, e.g. two ranks sharing one)")
args = parser.parse_args()
dtype = getattr(torch, args.dtype or ("float64" if args.float64 else "float32"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import byte_count  # noqa: E402 - tests/mpi/byte_count.py

torch.set_num_threads(1)
hvd.init(comm=MPI.COMM_WORLD)
kwargs = json.loads(args.kwargs)


made = []


def make_optimizer(model):
    if args.horovod:
        return hvd.DistributedOptimizer(digits.base_optimizer(model, args.base), model.named_parameters())
    made.append(hvd_qadam.DistributedOptimizer(digits.base_optimizer(model, args.base), model.named_parameters(),
                                               **kwargs))
    return made[-1]


model, history = digits.train(hvd.rank(), hvd.size(), make_optimizer, epochs=100, max_steps=args.steps, dtype=dtype,
                              device=args.device)
params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
# bit patterns (NumPy has no bfloat16)
digest = hashlib.sha256(b"".join(p.view(torch.uint8).numpy().tobytes() for p in params.values())).hexdigest()
digests = hvd.allgather_object(digest)
stats = None
if made:
    s = made[0].communication_stats
    passthrough = any(not (g.compressed and s.compressed) or s.exchange == "horovod"
                      for g in made[0].engine.layout.groups) or made[0].config.uplink.passthrough
    stats = {"sent_bytes": s.sent_bytes, "fp32_bytes": s.fp32_bytes, "topology": s.topology,
             "passthrough_bytes_per_element": byte_count.passthrough_bytes_per_element(made[0])
             if passthrough and s.topology in ("allgather", "sharded") else None}
stats_all = hvd.allgather_object(stats)
if hvd.rank() == 0:
    torch.save({"params": params, "digests": digests, "size": hvd.size(), "loss": history[-1]["loss"],
                "stats": stats_all}, args.out)
hvd.shutdown()
sys.exit(0)
