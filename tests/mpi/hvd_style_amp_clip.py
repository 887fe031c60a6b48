"""Mixed precision and gradient clipping the way Horovod's docs and pytorch_mnist.py do them, on CPU.

    mpirun -np 2 python hvd_style_amp_clip.py --impl horovod|hvd_qadam [--amp bf16|off]
        [--clip 1.0] [--inject-inf-step K | --inject-inf-step none,K (both cases)]

Per step: autocast(cpu, bfloat16) forward, scaler.scale(loss).backward(), optimizer.synchronize()
(gradients averaged now), scaler.unscale_(optimizer), clip_grad_norm_, then
``with optimizer.skip_synchronize(): scaler.step(optimizer)`` and scaler.update().
``--inject-inf-step K`` puts an Inf into one gradient of rank 1 during its backward at step K (an
fp16-style overflow on one rank only): after the exchange every rank must see it, skip that step
and halve its scale, so the scales stay equal on all ranks and the replicas identical.
"""
import argparse

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_style_common import add_impl_args, distributed_optimizer_class, report, run_all

parser = argparse.ArgumentParser(description="GradScaler + clipping with a Horovod DistributedOptimizer (CPU)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--clip", type=float, default=0.5, help="max gradient norm (0: no clipping)")
parser.add_argument("--amp", choices=["bf16", "off"], default="bf16")
parser.add_argument("--inject-inf-step", default="none",
                    help="step at which rank 1 gets an Inf gradient (none: never); a list (none,12) runs each case")
parser.add_argument("--seed", type=int, default=42)
add_impl_args(parser)
def main(args, inject_inf_step):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr * hvd.size())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    DistributedOptimizer = distributed_optimizer_class(args)
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average)
    # A small growth interval so that the scale moves within a few dozen steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)

    g = torch.Generator().manual_seed(1000 + hvd.rank())   # each rank its own data
    w_true = torch.randn(20, 1, generator=torch.Generator().manual_seed(3))
    scales, skipped, clipped_norms = [], 0, []
    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 20, generator=g)
        y = torch.sin(x @ w_true) + 0.1 * torch.randn(args.batch_size, 1, generator=g)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = F.mse_loss(model(x).float(), y)
        overflow = None
        if step == inject_inf_step and hvd.rank() == 1:
            # One gradient element overflows in this rank's backward, before any hook of the
            # DistributedOptimizer sees it (a tensor hook runs before gradient accumulation).
            mask = torch.zeros_like(model[0].weight)
            mask[0, 0] = float("inf")
            overflow = model[0].weight.register_hook(lambda grad: grad + mask)
        scaler.scale(loss).backward()
        if overflow is not None:
            overflow.remove()
        # Make sure all async allreduces are done
        optimizer.synchronize()
        # In-place unscaling of all gradients before clipping and the weights update
        scaler.unscale_(optimizer)
        if args.clip > 0:
            clipped_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)))
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        before = scaler.get_scale()
        scaler.update()
        skipped += int(scaler.get_scale() < before)
        scales.append(scaler.get_scale())

    final = hvd.allreduce(loss.detach().float(), name="final_loss").item()
    report(args, model, final, case="clean" if inject_inf_step < 0 else f"inf_at_{inject_inf_step}",
           scale=scaler.get_scale(), scales=scales, skipped=skipped,
           grad_norm_first=clipped_norms[0] if clipped_norms else None)


if __name__ == "__main__":
    hvd.init()
    args = parser.parse_args()
    for step in args.inject_inf_step.split(","):
        step = -1 if step == "none" else int(step)
        run_all(args, lambda one: main(one, step), case="clean" if step < 0 else f"inf_at_{step}")
