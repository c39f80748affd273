"""Train a character-level transformer language model on Python's own source code with
one of hpcqn's optimizers (or AdamW), data-parallel on any number of processes.

One process, then the same on two processes under each launcher::

    python examples/transformer_lm.py --optimizer mkor
    torchrun --nproc_per_node 2 examples/transformer_lm.py --optimizer mkor
    mpiexec -n 2 python examples/transformer_lm.py --optimizer mkor
    srun -n 2 python examples/transformer_lm.py --optimizer mkor   # mpi4py on Slurm's MPI

``--ddp`` wraps the model in ``DistributedDataParallel`` (torch.distributed is then
initialised under mpiexec too, from the MPI launcher's ranks); ``--accumulate K`` splits
each rank's batch into K micro-batches (K backward calls per step); ``--short`` trains a
tiny model for a few steps (what CI runs). Rank 0 prints the training and validation loss
(nats per character) each epoch and the median step time.

The model and the data (the text of standard-library modules, the last 10 % held out)
are in ``hpcqn/experiments/charlm.py``: copy it next to this script to change them. The
same training as a job with checkpoints: ``hpcqn run jobs/charlm.toml``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

import hpcqn
import hpcqn.torch as ht
from hpcqn.experiments import charlm

OPTIMIZERS = ("mkor", "mkor_h", "kfac", "mlbfgs", "adamw")
# Each optimizer's learning rate: the best validation loss of a grid on this model, 2 epochs
# (benchmarks/sweep_charlm.py, benchmarks/results/charlm_sweep.jsonl)
LEARNING_RATES = {"mkor": 3e-3, "mkor_h": 3e-3, "kfac": 3e-3, "mlbfgs": 0.03, "adamw": 1e-3}


def start_torch_distributed(ddp: bool) -> None:
    """torch.distributed when a torch launcher started us (torchrun sets WORLD_SIZE and
    MASTER_ADDR), or when DDP is asked for under an MPI launcher (its ranks numbered as
    MPI's). Otherwise hpcqn talks MPI itself (mpiexec, srun) or runs alone."""
    import torch.distributed as dist

    env = os.environ
    mpi_rank = env.get("PMI_RANK") or env.get("OMPI_COMM_WORLD_RANK")
    mpi_size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" not in env and not (ddp and mpi_rank is not None):
        return
    if "TORCHELASTIC_RUN_ID" not in env:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        env.update({"RANK": mpi_rank, "WORLD_SIZE": mpi_size or "1"})
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def make_optimizer(name: str, model: nn.Module, lr: float):
    """hpcqn's optimizers average the gradients themselves over the world (or DDP's
    group); AdamW needs hpcqn.torch.average_gradients unless DDP averaged them."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if name == "mlbfgs":
        return ht.MLBFGS(model.parameters(), lr=lr, history=10, period=10, beta=0.9,
                         weight_decay=0.01)
    if name == "kfac":
        return ht.KFAC(model, lr=lr, optimizer="adam", factor_freq=1, inv_freq=10,
                       damping=0.03, verbose=True)
    return ht.MKOR(model, lr=lr, optimizer="adam", factor_freq=10, hybrid=name == "mkor_h",
                   verbose=True)


@torch.no_grad()
def validation_loss(model: nn.Module, data: dict, comm: hpcqn.Communicator) -> float:
    """Mean loss over the held-out windows, each rank evaluating its share."""
    mine = ht.shard(data["test_x"].shape[0], comm)
    x, y = data["test_x"][mine], data["test_y"][mine]
    total = float(charlm.loss(model, x, y)) * x.numel() if len(mine) else 0.0
    sums, _ = comm.allreduce_scalars([total, float(x.numel())])
    return sums[0] / sums[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="mkor")
    parser.add_argument("--lr", type=float, help="default: the optimizer's best of a grid")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global, in windows")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--ddp", action="store_true", help="wrap in DistributedDataParallel")
    parser.add_argument("--short", action="store_true", help="a tiny run (CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    start_torch_distributed(args.ddp)
    comm = hpcqn.get_comm()  # the world: MPI's, torch.distributed's, or this process alone
    data = charlm.text_windows(context=32 if args.short else 64,
                               max_chars=60_000 if args.short else None)
    torch.manual_seed(args.seed)
    model = charlm.CharTransformer(width=16 if args.short else args.width,
                                   context=data["train_x"].shape[1])
    ht.broadcast_parameters(model, comm)  # the same start on every rank
    trained = nn.parallel.DistributedDataParallel(model) if args.ddp else model
    lr = args.lr if args.lr is not None else LEARNING_RATES[args.optimizer]
    optimizer = make_optimizer(args.optimizer, trained, lr)
    averages_itself = args.optimizer != "adamw" or args.ddp
    batches = ht.GlobalBatches(data["train_x"].shape[0], args.batch_size, comm, seed=args.seed)
    steps_per_epoch = 8 if args.short else len(batches)
    if comm.rank == 0:
        print(f"{args.optimizer} lr={lr:g} on {comm.size} process(es) ({comm.transport_name}"
              f"{', DDP' if args.ddp else ''}); {sum(p.numel() for p in model.parameters()):,}"
              f" parameters; {steps_per_epoch} steps of {args.batch_size} windows an epoch",
              flush=True)
    seconds: list[float] = []
    for epoch in range(args.epochs):
        batches.set_epoch(epoch)
        losses = []
        for step, (rows, weight) in enumerate(batches):
            if step == steps_per_epoch:
                break
            start = time.perf_counter()
            optimizer.zero_grad()
            step_loss = 0.0
            for micro in np.array_split(rows, args.accumulate):
                index = torch.as_tensor(micro)
                # this rank's mean loss weighted so that the ranks' average is the global
                # batch's mean (GlobalBatches), and each micro-batch by its share of it
                loss = charlm.loss(trained, data["train_x"][index], data["train_y"][index])
                (loss * weight * len(micro) / len(rows)).backward()
                step_loss += loss.item() * len(micro) / len(rows)
            if not averages_itself:
                ht.average_gradients(model.parameters(), comm)
            if args.optimizer == "mkor_h":
                optimizer.step(loss=step_loss)
            else:
                optimizer.step()
            seconds.append(time.perf_counter() - start)
            losses.append(step_loss)
        train_loss = comm.allreduce_scalars([statistics.fmean(losses)])[0][0] / comm.size
        val = validation_loss(model, data, comm)
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  validation loss {val:.4f}"
                  f"  step {1e3 * statistics.median(seconds):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # every process done with its collectives before any tears gloo down (else a
        # process still talking to one that exited can abort in gloo's threads)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
