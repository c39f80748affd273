"""One launch of hpcqn.torch's data-parallel training, started by tests/test_launchers.py
under ``torchrun --nproc_per_node N`` or ``mpiexec -n N`` (or as one process): every
optimizer, with and without ``DistributedDataParallel``, against a one-process run on
the global batch computed in this process (float64). Rank 0 prints one JSON line per
case (``{"optimizer", "ddp", "max_diff", "switched_at"}``); any case beyond ``--atol``
fails the launch.

``--transport``: ``torch`` initialises torch.distributed (gloo; under mpiexec from the
MPI launcher's rank and size, with ``MASTER_ADDR``/``MASTER_PORT`` from the environment),
``none`` leaves it alone (then only the cases without DDP run), ``uninitialised`` only
constructs an optimizer (a launch that must be refused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import nn

import hpcqn
import hpcqn.torch as ht

OPTIMIZERS = ("sgd", "mlbfgs", "mkor", "mkor_h", "kfac")
STEPS = 10
BATCH = 25  # splits unevenly over 2 and 3 ranks


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 16), nn.Tanh(),
                         nn.Linear(16, 10)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 1, 8, 8, generator=gen, dtype=torch.float64)
    return x, (x.flatten(1)[:, :10].sum(1) * 3).long() % 10


def optimizer(name: str, net: nn.Module, comm):
    if name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if name == "mlbfgs":
        return ht.MLBFGS(net.parameters(), comm, lr=0.05, period=2, history=3, beta=0.9)
    if name == "kfac":
        return ht.KFAC(net, comm, lr=0.1, inv_freq=2)
    return ht.MKOR(net, comm, lr=0.1, factor_freq=2, hybrid=name == "mkor_h",
                   hybrid_window=2, hybrid_threshold=0.05)


def train(name: str, comm, ddp: bool) -> tuple[np.ndarray, int | None]:
    net = model()
    wrapped = nn.parallel.DistributedDataParallel(net) if ddp else net
    opt = optimizer(name, wrapped if name in ("mkor", "mkor_h", "kfac") else net, comm)
    x, y = data()
    batches = ht.GlobalBatches(x.shape[0], BATCH, comm, shuffle=False)
    for rows, weight in batches:
        index = torch.as_tensor(rows)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(wrapped(x[index]), y[index]) * weight
        loss.backward()
        if name == "sgd" and not ddp:
            ht.average_gradients(net.parameters(), comm)
        if name == "mkor_h":
            opt.step(loss=loss.detach())
        else:
            opt.step()
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy().copy()
    switch = getattr(opt, "switch", None)
    return flat, None if switch is None else switch.switched_at


def init_torch() -> None:
    import torch.distributed as dist

    env = os.environ
    if "RANK" not in env:  # under mpiexec: the MPI launcher's numbering
        rank = env.get("PMI_RANK") or env.get("OMPI_COMM_WORLD_RANK") or "0"
        size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or "1"
        env.update({"RANK": rank, "WORLD_SIZE": size})
    dist.init_process_group("gloo")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=("torch", "none", "uninitialised"),
                        default="torch")
    parser.add_argument("--atol", type=float, default=1e-10)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.transport == "uninitialised":
        ht.MKOR(model(), lr=0.1)  # comm=None: the world
        print("constructed", flush=True)
        return 0
    if args.transport == "torch":
        init_torch()
    comm = hpcqn.get_comm()
    failures = []
    for name in args.optimizers.split(","):
        reference, ref_switch = train(name, hpcqn.serial_comm(), ddp=False)
        for ddp in (False, True) if args.transport == "torch" else (False,):
            ours, switch = train(name, comm, ddp)
            diff = float(comm.allreduce(np.array([np.abs(ours - reference).max()]),
                                        op="max")[0])
            switches = comm.allgather_object(switch)
            if comm.rank == 0:
                print(json.dumps({"optimizer": name, "ddp": ddp, "ranks": comm.size,
                                  "transport": comm.transport_name, "max_diff": diff,
                                  "switched_at": switches, "reference_switch": ref_switch}),
                      flush=True)
            if not diff <= args.atol or len(set(switches)) > 1 or switches[0] != ref_switch:
                failures.append((name, ddp, diff, switches, ref_switch))
    if failures:
        print(f"rank {comm.rank}: failed cases {failures}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
