"""Horovod's examples/pytorch/pytorch_imagenet_resnet50.py, shrunk: checkpoints on rank 0, resume.

    mpirun -np 2 python hvd_style_resume.py --impl horovod|hvd_qadam --epochs E
        --checkpoint-format DIR/checkpoint-{epoch}.pt [--batches-per-allreduce 2] [--fp16-allreduce]
    mpirun -np 2 python hvd_style_resume.py --impl horovod,hvd_qadam --epochs 2,3
        --checkpoint-format DIR/{run}-{case}/checkpoint-{epoch}.pt

As in the example: the last checkpoint found is the epoch to resume from, rank 0 tells the others
(hvd.broadcast), only rank 0 torch.load()s model and optimizer state, then
hvd.broadcast_parameters + hvd.broadcast_optimizer_state bring every rank to it. Sub-batches are
accumulated over backward_passes_per_step; the learning rate warms up per batch, and rank 0 saves
{'model', 'optimizer'} state dicts after every epoch. A run for E epochs that resumes from a
checkpoint of epoch k must end where an uninterrupted run for E epochs ends.

``--epochs 2,3`` runs the script body twice in the same processes (case "restarted": 2 epochs, then a
fresh model and optimizer that resume from checkpoint-2 and train to epoch 3) after the case
"straight" (3 epochs in one go, another checkpoint directory), for each --impl (see hvd_style_common).
"""
import argparse
import math
import os

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

from hvd_style_common import add_impl_args, distributed_optimizer_class, report, run_all

parser = argparse.ArgumentParser(description="PyTorch ImageNet-style example (synthetic data, small MLP)")
parser.add_argument("--checkpoint-format", required=True,
                    help="checkpoint file format, with {epoch} (and {run}, {case} for lists of runs)")
parser.add_argument("--fp16-allreduce", action="store_true", default=False)
parser.add_argument("--batches-per-allreduce", type=int, default=2)
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--train-size", type=int, default=384)
parser.add_argument("--epochs", default="3", help="E, or E1,E2,...: restart after E1, E2, ...")
parser.add_argument("--base-lr", type=float, default=0.025)
parser.add_argument("--warmup-epochs", type=float, default=2)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--wd", type=float, default=0.00005)
parser.add_argument("--seed", type=int, default=42)
add_impl_args(parser)


def segment(args, epochs, checkpoint_format):
    """One launch of the example: resume from the last checkpoint if any, train to `epochs`."""
    allreduce_batch_size = args.batch_size * args.batches_per_allreduce
    torch.manual_seed(args.seed + 1000 * hvd.rank())   # rank 0's weights (or checkpoint) must win
    torch.set_num_threads(1)

    resume_from_epoch = 0
    for try_epoch in range(epochs, 0, -1):
        if os.path.exists(checkpoint_format.format(epoch=try_epoch)):
            resume_from_epoch = try_epoch
            break
    # Horovod: broadcast resume_from_epoch from rank 0 (which will have checkpoints) to other ranks.
    resume_from_epoch = hvd.broadcast(torch.tensor(resume_from_epoch), root_rank=0,
                                      name="resume_from_epoch").item()

    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(args.train_size, 32, generator=g)
    y_all = (x_all @ torch.randn(32, 10, generator=g) + 0.5 * torch.randn(args.train_size, 10, generator=g)).argmax(1)
    train_dataset = torch.utils.data.TensorDataset(x_all, y_all)
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=allreduce_batch_size, sampler=train_sampler)

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    lr_scaler = args.batches_per_allreduce * hvd.size()
    optimizer = optim.SGD(model.parameters(), lr=args.base_lr * lr_scaler, momentum=args.momentum,
                          weight_decay=args.wd)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    DistributedOptimizer = distributed_optimizer_class(args)
    optimizer = DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=compression,
        backward_passes_per_step=args.batches_per_allreduce,
        op=hvd.Average,
        gradient_predivide_factor=args.gradient_predivide_factor)

    # Horovod: restore on the first worker which will broadcast weights to other workers.
    if resume_from_epoch > 0 and hvd.rank() == 0:
        filepath = checkpoint_format.format(epoch=resume_from_epoch)
        checkpoint = torch.load(filepath)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    # Horovod: broadcast parameters & optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def adjust_learning_rate(epoch, batch_idx):
        if epoch < args.warmup_epochs:
            epoch += float(batch_idx + 1) / len(train_loader)
            lr_adj = 1. / hvd.size() * (epoch * (hvd.size() - 1) / args.warmup_epochs + 1)
        else:
            lr_adj = 1.
        for param_group in optimizer.param_groups:
            param_group["lr"] = args.base_lr * hvd.size() * args.batches_per_allreduce * lr_adj

    class Metric:
        def __init__(self, name):
            self.name, self.sum, self.n = name, torch.tensor(0.), torch.tensor(0.)

        def update(self, val):
            self.sum += hvd.allreduce(val.detach().cpu(), name=self.name)
            self.n += 1

        @property
        def avg(self):
            return self.sum / self.n

    def train(epoch):
        model.train()
        train_sampler.set_epoch(epoch)
        train_loss = Metric("train_loss")
        for batch_idx, (data, target) in enumerate(train_loader):
            adjust_learning_rate(epoch, batch_idx)
            optimizer.zero_grad()
            for i in range(0, len(data), args.batch_size):
                loss = F.cross_entropy(model(data[i:i + args.batch_size]), target[i:i + args.batch_size])
                train_loss.update(loss)
                loss.div_(math.ceil(float(len(data)) / args.batch_size))
                loss.backward()
            optimizer.step()
        return train_loss.avg.item()

    def save_checkpoint(epoch):
        if hvd.rank() == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, checkpoint_format.format(epoch=epoch + 1))

    loss = float("nan")
    for epoch in range(resume_from_epoch, epochs):
        loss = train(epoch)
        save_checkpoint(epoch)
    return model, loss, resume_from_epoch, (epochs - resume_from_epoch) * len(train_loader)


def main(args):
    schedule = [int(e) for e in args.epochs.split(",")]
    cases = [("straight", schedule[-1:])] + ([("restarted", schedule)] if len(schedule) > 1 else [])
    for case, epochs_list in cases:
        fmt = args.checkpoint_format.replace("{run}", args.impl + "-" + args.quantizer).replace("{case}", case)
        if hvd.rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(fmt)), exist_ok=True)
        for epochs in epochs_list:
            model, loss, resumed_from, steps = segment(args, epochs, fmt)
        report(args, model, loss, case=case, resumed_from=resumed_from, steps=steps)


if __name__ == "__main__":
    hvd.init()
    run_all(parser.parse_args(), main)
