"""Horovod's examples/pytorch/pytorch_mnist.py, shrunk: a small CNN on synthetic 16x16 "digits".

    mpirun -np 2 python hvd_style_mnist.py --impl horovod|hvd_qadam [--fp16-allreduce]
        [--gradient-predivide-factor F] [--batches-per-allreduce K] [--quantizer none|default]
    (--impl horovod,hvd_qadam --quantizer none,default --compression none,fp16: every combination,
     one after the other in the same processes, see hvd_style_common; quantizer="none" is left out
     with fp16, which hvd_qadam refuses as contradictory)

As in the example: hvd.init(), torch.manual_seed, DistributedSampler, lr scaled by hvd.size(),
broadcast_parameters + broadcast_optimizer_state of the plain optimizer, then
DistributedOptimizer(compression=..., op=hvd.Average, gradient_predivide_factor=...), and metrics
averaged with hvd.allreduce. No dropout, so that the two implementations consume the same random
numbers and a full-precision run can be compared with Horovod's to the last bits.
"""
import argparse

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

from hvd_style_common import add_impl_args, distributed_optimizer_class, report, run_all

parser = argparse.ArgumentParser(description="PyTorch MNIST-style example (synthetic data)")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--batches-per-allreduce", type=int, default=1,
                    help="backward passes per step (backward_passes_per_step)")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--train-size", type=int, default=1024)
parser.add_argument("--lr", type=float, default=0.04)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--fp16-allreduce", action="store_true", default=False)
parser.add_argument("--compression", default=None, help="none, fp16 or a list (default: fp16 if --fp16-allreduce)")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0)
add_impl_args(parser)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3)     # 16 -> 14 -> pool 7
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3)    # 7 -> 5 -> pool 2; weight 1152 elements
        self.fc1 = nn.Linear(64, 32)                    # 2048 elements
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = x.view(-1, 64)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_digits(n, seed):
    """Ten smooth random 16x16 prototypes plus noise: learnable in a few dozen steps, same on every rank."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.avg_pool2d(torch.randn(10, 1, 20, 20, generator=torch.Generator().manual_seed(0)), 5, stride=1)
    prototypes = prototypes / prototypes.std()
    y = torch.randint(0, 10, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 1, 16, 16, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


def main(args):
    torch.manual_seed(args.seed + 1000 * hvd.rank())   # different initial models: the broadcast must fix that
    torch.set_num_threads(1)

    train_dataset = synthetic_digits(args.train_size, seed=1)
    test_dataset = synthetic_digits(256, seed=2)
    allreduce_batch_size = args.batch_size * args.batches_per_allreduce
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=allreduce_batch_size,
                                               sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=64, sampler=test_sampler)

    model = Net()
    lr_scaler = hvd.size() * args.batches_per_allreduce
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

    # Horovod: broadcast parameters & optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    DistributedOptimizer = distributed_optimizer_class(args)
    optimizer = DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=compression,
                                     backward_passes_per_step=args.batches_per_allreduce,
                                     op=hvd.Average,
                                     gradient_predivide_factor=args.gradient_predivide_factor)

    steps = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        train_sampler.set_epoch(epoch)
        for data, target in train_loader:
            optimizer.zero_grad()
            for i in range(0, len(data), args.batch_size):
                loss = F.nll_loss(model(data[i:i + args.batch_size]), target[i:i + args.batch_size])
                loss.div_(args.batches_per_allreduce)
                loss.backward()
            optimizer.step()
            steps += 1

    model.eval()
    test_loss = 0.
    with torch.no_grad():
        for data, target in test_loader:
            test_loss += F.nll_loss(model(data), target, reduction="sum").item()
    test_loss = metric_average(test_loss / len(test_sampler), "avg_loss")
    report(args, model, test_loss, case="fp16" if args.fp16_allreduce else "none", steps=steps)


if __name__ == "__main__":
    hvd.init()
    args = parser.parse_args()
    for comp in (args.compression or ("fp16" if args.fp16_allreduce else "none")).split(","):
        one = argparse.Namespace(**{**vars(args), "fp16_allreduce": comp == "fp16"})
        run_all(one, main, case=comp,
                skip=lambda impl, quantizer: comp == "fp16" and impl == "hvd_qadam" and quantizer == "none")
