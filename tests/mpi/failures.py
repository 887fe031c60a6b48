"""Runs on every rank under mpirun and provokes one failure; each rank prints what it saw.

Modes: nan (rank 1 gets an Inf gradient at step 3), params (rank 1 has a different model),
config (rank 1 asks for other bits), dead (rank 1 dies at step 3), hang (rank 1 stops
responding at step 3), exit (rank 1 exits cleanly at step 3), mismatch (at step 3 rank 0 restores
a checkpoint of step 1, so its step counter disagrees with the others').
"""
import argparse
import os
import sys
import time

from mpi4py import MPI

import horovod.torch as hvd
import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from harness import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["nan", "params", "config", "dead", "hang", "exit", "mismatch"])
parser.add_argument("--topology", default="allgather")
args = parser.parse_args()
torch.set_num_threads(1)
if args.topology == "ps":
    hvd_qadam.ps_init()          # the last rank serves, and exits when the workers are done
else:
    hvd.init(comm=MPI.COMM_WORLD)
rank = hvd.rank()

hidden = 64 if (args.mode == "params" and rank == 1) else 128
bits = 3 if (args.mode == "config" and rank == 1) else 4
model = digits.make_model(hidden)
opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.named_parameters(),
                                     bits=bits, topology=args.topology, algorithm="efficient_adam")
x, y, _, _ = digits.load_digits_split()
t0 = time.time()


def inject_inf(grad):
    grad = grad.clone()
    grad[0, 0] = float("inf")
    return grad


try:
    for step in range(6):
        if step == 1 and args.mode == "mismatch":
            saved = opt.state_dict()
        if step == 3 and rank == 0 and args.mode == "mismatch":
            opt.load_state_dict(saved)   # only rank 0 goes back to step 1
        opt.zero_grad()
        # Through the graph, not after backward(): exchanges start from backward hooks.
        hook = (model[0].weight.register_hook(inject_inf)
                if step == 3 and rank == 1 and args.mode == "nan" else None)
        torch.nn.functional.cross_entropy(model(x[rank::3][:32]), y[rank::3][:32]).backward()
        if hook is not None:
            hook.remove()
        if step == 3 and rank == 1 and args.mode == "dead":
            print(f"RANK {rank} DYING", flush=True)
            os._exit(17)
        if step == 3 and rank == 1 and args.mode == "hang":
            print(f"RANK {rank} HANGING", flush=True)
            time.sleep(3600)
        if step == 3 and rank == 1 and args.mode == "exit":
            print(f"RANK {rank} EXITING", flush=True)
            sys.exit(0)
        opt.step()
except hvd_qadam.CommError as e:
    print(f"RANK {rank} ERROR {type(e).__name__}: {e} | after {time.time() - t0:.1f}s", flush=True)
    sys.exit(4)
except (hvd_qadam.NonFiniteGradientError, hvd_qadam.ConsistencyError) as e:
    resid = sum(float(t.double().square().sum()) for k, t in opt.engine.bank.current.items() if k.endswith(".e")) ** 0.5
    print(f"RANK {rank} ERROR {type(e).__name__}: {e} | step_count={opt.engine.step_count} "
          f"residual_norm={resid:.6g} after {time.time() - t0:.1f}s", flush=True)
    MPI.COMM_WORLD.Barrier()   # let every rank report before mpirun tears the job down
    sys.exit(3)
print(f"RANK {rank} FINISHED", flush=True)
