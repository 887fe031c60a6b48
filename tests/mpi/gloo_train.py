"""Runs on every rank under ``horovodrun --gloo`` (Horovod's Gloo controller, no MPI): trains the
digits MLP with hvd_qadam, then tries to build a ``ps`` optimizer (which needs MPI). Rank 0 prints
``GLOO_RESULT {json}``: world size, controller, every rank's parameter digest, first and last loss,
and the error the ps optimizer was refused with."""
import argparse
import hashlib
import json
import os
import sys

import horovod.torch as hvd
import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from harness import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--topology", default="allgather")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

torch.set_num_threads(1)
hvd.init()


def make_optimizer(model):
    return hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(),
                                          algorithm="qadam", topology=args.topology)


model, _ = digits.train(hvd.rank(), hvd.size(), make_optimizer, epochs=100, max_steps=args.steps, global_batch=96)
x, y, _, _ = digits.load_digits_split()      # the whole training set: loss before and after
first_model = digits.make_model(seed=0)
with torch.no_grad():
    first_loss = float(torch.nn.functional.cross_entropy(first_model(x), y))
    last_loss = float(torch.nn.functional.cross_entropy(model(x), y))
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
digests = hvd.allgather_object(digest)

ps_refused = None
try:
    hvd_qadam.DistributedOptimizer(digits.base_optimizer(first_model), first_model.named_parameters(),
                                   topology="ps")
except ValueError as e:
    ps_refused = str(e)

if hvd.rank() == 0:
    print("GLOO_RESULT " + json.dumps({"size": hvd.size(), "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled(),
                                       "digests": digests, "first_loss": first_loss, "last_loss": last_loss,
                                       "ps_refused": ps_refused}), flush=True)
hvd.shutdown()
