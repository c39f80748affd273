"""Train a small CNN on scikit-learn's digits, data-parallel, with hpcqn's optimizers and
the first-order baselines: the training loop to copy into your own code.

One process, then two processes under each launcher (the same steps, to rounding)::

    python examples/digits_cnn.py --optimizer mkor
    mpiexec -n 2 python examples/digits_cnn.py --optimizer mkor
    torchrun --standalone --nproc_per_node 2 examples/digits_cnn.py --optimizer mkor
    srun -n 2 python examples/digits_cnn.py --optimizer mkor   # mpi4py on Slurm's MPI

``--optimizer`` takes one or more of mlbfgs, mkor, mkor_h, kfac, sgd, adam, adamw, lamb
(default: all of them, one after the other from the same initial model). hpcqn's
optimizers average the gradients over the processes themselves; the torch optimizers get
``hpcqn.torch.average_gradients`` between ``backward()`` and ``step()``. Under torchrun
the script calls ``torch.distributed.init_process_group("gloo")`` first, and hpcqn's
world is then torch.distributed's default group. ``--short`` runs a few steps (CI).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import hpcqn
import hpcqn.torch as ht

OPTIMIZERS = ("mlbfgs", "mkor", "mkor_h", "kfac", "sgd", "adam", "adamw", "lamb")
# learning rates that train this model well in a few epochs
LEARNING_RATES = {"mlbfgs": 0.3, "mkor": 0.1, "mkor_h": 0.1, "kfac": 0.1, "sgd": 0.1,
                  "adam": 0.01, "adamw": 0.01, "lamb": 0.01}


def make_model() -> nn.Module:
    """Two 3x3 convolutions (8 and 16 channels) and a linear classifier."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def make_optimizer(name: str, model: nn.Module, comm: hpcqn.Communicator, lr: float,
                   steps: int) -> torch.optim.Optimizer:
    if name == "mlbfgs":
        return ht.MLBFGS(model.parameters(), comm, lr=lr, history=10, period=10)
    if name in ("mkor", "mkor_h"):
        return ht.MKOR(model, comm, lr=lr, factor_freq=10, hybrid=name == "mkor_h",
                       hybrid_window=max(2, steps // 10))
    if name == "kfac":
        return ht.KFAC(model, comm, lr=lr, damping=0.1, inv_freq=10)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return ht.LAMB(model.parameters(), lr=lr)


def train(name: str, data: dict, comm: hpcqn.Communicator, args: argparse.Namespace,
          dtype: torch.dtype) -> tuple[float, float, float]:
    """Train one model from the seed's initial weights; returns (training loss, test
    accuracy, seconds)."""
    torch.manual_seed(args.seed)
    model = make_model().to(dtype)
    ht.broadcast_parameters(model, comm)                 # every rank starts from rank 0's
    batches = ht.GlobalBatches(len(data["train_y"]), args.batch_size, comm, seed=args.seed)
    steps_per_epoch = 5 if args.short else len(batches)
    lr = args.lr if args.lr is not None else LEARNING_RATES[name]
    optimizer = make_optimizer(name, model, comm, lr, args.epochs * steps_per_epoch)
    averages_itself = name in ("mlbfgs", "mkor", "mkor_h", "kfac")
    x, y = data["train_x"].to(dtype), data["train_y"]
    start = time.perf_counter()
    for epoch in range(args.epochs):
        batches.set_epoch(epoch)
        for step, (rows, weight) in enumerate(batches):
            if step == steps_per_epoch:
                break
            index = torch.as_tensor(rows)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            (loss * weight).backward()                   # weight: see GlobalBatches
            if not averages_itself:
                ht.average_gradients(model.parameters(), comm)
            if name == "mkor_h":
                optimizer.step(loss=loss.detach())       # MKOR-H's switch reads the loss
            else:
                optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(x), y))
        predicted = model(data["test_x"].to(dtype)).argmax(dim=1)
        accuracy = float((predicted == data["test_y"]).double().mean())
    return train_loss, accuracy, seconds


def digits() -> dict:
    """The digits images (8x8, scaled to [0, 1]), the last 20 % held out for testing."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    split = int(0.8 * len(y))
    return {"train_x": x[:split], "train_y": y[:split], "test_x": x[split:],
            "test_y": y[split:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS)
    parser.add_argument("--lr", type=float, help="default: a good rate for each optimizer")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global, in images")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="a few steps (CI)")
    args = parser.parse_args()
    if args.short:
        args.epochs = 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if "TORCHELASTIC_RUN_ID" in os.environ:              # started by torchrun
        import torch.distributed as dist

        dist.init_process_group("gloo")
    comm = hpcqn.get_comm()          # the world: MPI's, torch.distributed's, or one process
    data = digits()
    dtype = getattr(torch, args.dtype)
    if comm.rank == 0:
        print(f"{comm.size} process(es) over {comm.transport_name}; "
              f"{np.prod(data['train_x'].shape[:1])} training images", flush=True)
    for name in args.optimizer:
        loss, accuracy, seconds = train(name, data, comm, args, dtype)
        if comm.rank == 0:
            print(f"result: optimizer={name} loss={loss:.10e} accuracy={accuracy:.4f} "
                  f"seconds={seconds:.2f}", flush=True)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # every process done with its collectives before any tears gloo down (else a
        # process still talking to one that exited can abort in gloo's threads)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
