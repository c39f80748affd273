"""Training jobs for torch models: on scikit-learn's digits an MLP or a small CNN
(classification) or an autoencoder (reconstruction); on Python's standard-library source
a character-level transformer language model (:mod:`hpcqn.experiments.charlm`), each
trained data-parallel with mL-BFGS (:class:`hpcqn.torch.MLBFGS`), MKOR / MKOR-H
(:class:`hpcqn.torch.MKOR`), K-FAC (:class:`hpcqn.torch.KFAC`) (these average gradients
themselves) or torch's SGD/Adam/AdamW or LAMB with :func:`average_gradients`, from the
same initial model on the same batches."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..comm import Communicator
from ..device import bind
from ..options import check
from ..run import NOTHING_AGREED, CheckpointPolicy, Driver, skip_done
from ..signals import StopFlag
from ..torch import methods
from ..torch.data import GlobalBatches, average_gradients, broadcast_parameters

MODELS = ("mlp", "cnn", "autoencoder", "charlm")
# What each model learns: its loss and its test metric (loss_of, evaluate)
TASKS = {"mlp": "classify", "cnn": "classify", "autoencoder": "reconstruct",
         "charlm": "language"}
# The language model's windows of characters, and the training windows its train loss
# is measured on each epoch (the first ones: the whole set would cost an epoch's forward)
CONTEXT = 64
TRAIN_LOSS_WINDOWS = 1024
DEVICES = ("cpu", "cuda", "auto")
METHODS = methods.METHODS
# These average (or reduce-scatter) the gradients inside their step.
SELF_AVERAGING = ("mlbfgs", "mkor", "mkor_h", "kfac")


def digits(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Digits as tensors: 75/25 train/test split by ``seed``, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(data.target.size)
    n_train = int(0.75 * order.size)
    images = torch.as_tensor(data.images / 16.0, dtype=dtype).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(data.target)
    train, test = torch.as_tensor(order[:n_train]), torch.as_tensor(order[n_train:])
    return {"train_x": images[train], "train_y": labels[train],
            "test_x": images[test], "test_y": labels[test]}


def load_data(model_name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
              context: int = CONTEXT, max_chars: int = 0) -> dict[str, torch.Tensor]:
    """The data set of a model: :func:`digits` (split by ``seed``), or for ``charlm`` the
    windows of ``context`` characters of :func:`hpcqn.experiments.charlm.text_windows`
    (codes, int64) from the corpus's first ``max_chars`` characters (0: all of it)."""
    if model_name == "charlm":
        from .charlm import text_windows

        return text_windows(context, max_chars or None)
    return digits(seed, dtype)


def make_model(name: str, hidden: int = 128, seed: int = 0,
               dtype: torch.dtype = torch.float32, context: int = CONTEXT) -> nn.Module:
    """``mlp``: 64 -> hidden -> hidden -> 10 (ReLU); ``cnn``: two 3x3 convolutions (16,
    32 channels) and a linear classifier; ``autoencoder``: 64 -> hidden -> 16 -> hidden
    -> 64 (tanh, sigmoid output); ``charlm``: the character transformer of
    :mod:`hpcqn.experiments.charlm`, ``hidden`` wide, two blocks of four heads, on windows
    of ``context`` characters."""
    torch.manual_seed(seed)
    if name == "charlm":
        from .charlm import CharTransformer

        return CharTransformer(width=hidden, layers=2, heads=4, context=context).to(dtype)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                              nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    elif name == "autoencoder":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(),
                              nn.Linear(hidden, 16), nn.Tanh(), nn.Linear(16, hidden), nn.Tanh(),
                              nn.Linear(hidden, 64), nn.Sigmoid())
    else:
        raise ValueError(f"unknown model {name!r}; known: {MODELS}")
    return model.to(dtype)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> Any:
    """The mean loss of a :data:`TASKS` task: cross-entropy for ``"classify"``, mean
    squared reconstruction error (of the flattened images) for ``"reconstruct"``, mean
    cross-entropy over every predicted character for ``"language"``."""
    if task == "reconstruct":
        return nn.functional.mse_loss(model(x), x.reshape(x.shape[0], -1))
    if task == "language":
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           y.reshape(-1))
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module, data: dict[str, torch.Tensor],
             task: str = "classify") -> dict[str, float]:
    """Mean training loss and the test metrics: accuracy for ``"classify"``, the test
    loss for ``"reconstruct"``, the held-out loss (nats per character) and next-character
    accuracy for ``"language"``, whose training loss is over the first
    :data:`TRAIN_LOSS_WINDOWS` windows. Over the whole sets otherwise."""
    with torch.no_grad():
        n = TRAIN_LOSS_WINDOWS if task == "language" else None
        result = {"train_loss": float(loss_of(model, data["train_x"][:n],
                                              data["train_y"][:n], task))}
        if task in ("reconstruct", "language"):
            result["test_loss"] = float(loss_of(model, data["test_x"], data["test_y"], task))
        if task in ("classify", "language"):
            logits = model(data["test_x"])
            predicted = logits.argmax(dim=-1)
            result["test_accuracy"] = float((predicted == data["test_y"]).double().mean())
    return result


def select_device(device: str, comm: Communicator) -> torch.device:
    """The torch device this rank trains on. ``"cpu"``; ``"cuda"``: the GPU
    :func:`hpcqn.device.bind` chose from the local rank (an error when a rank has none);
    ``"auto"``: that GPU when every rank has one, else the CPU on every rank. Every rank
    calls this (the binding may need a shared-memory split, and the ranks agree)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    binding = bind(comm)
    usable = binding.index is not None and torch.cuda.is_available()
    why = binding.reason if binding.index is None else "torch has no CUDA"
    verdicts = comm.allgather_object(why if not usable else None)
    missing = [f"rank {r}: {w}" for r, w in enumerate(verdicts) if w is not None]
    if not missing:
        return torch.device("cuda", binding.index)
    if device == "cuda":
        raise ValueError("device 'cuda' asked for, but " + "; ".join(missing))
    return torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    """torch's generator (the batch order comes from GlobalBatches, a NumPy generator
    seeded by the run's seed and the epoch, so it needs no saved state)."""
    return {"torch": torch.get_rng_state()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


def train(
    method: str,
    comm: Communicator,
    model_name: str = "mlp",
    options: Mapping[str, Any] | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lr_schedule: str = "constant",
    metrics_path: Path | None = None,
    log: bool = True,
    hidden: int = 128,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    keep: int = 2,
    resume: bool = True,
    stop: StopFlag | None = None,
    device: str = "cpu",
    context: int = CONTEXT,
    max_chars: int = 0,
) -> dict[str, Any]:
    """Train one model with one method; rank 0 prints a line per epoch and writes one
    JSON line per epoch to ``metrics_path``. Returns the per-epoch records.

    With ``checkpoint_dir``: a checkpoint at the end of every epoch (and every
    ``checkpoint_every`` steps when positive) holding the model, the optimizer, the
    scheduler, the position in the data, the RNG states, the records and the
    configuration; with ``resume`` a run continues from the latest one there (on any rank
    count), and a different configuration is an error. With ``stop`` (a
    :class:`hpcqn.signals.StopFlag`), the ranks agree after every step whether any of them
    was signalled; if so they checkpoint and raise :class:`hpcqn.signals.Preempted`.
    ``device`` ("cpu", "cuda", "auto"; see :func:`select_device`) holds the model, the
    data and the optimizer state; it is not part of the configuration, so a run saved on
    one kind of device resumes on the other."""
    # Options as the method declares them (old names renamed), so a run resumes whichever
    # name the job file used.
    config = {"method": method, "model": model_name,
              "options": check(methods.options_of(method), dict(options or {}), method),
              "epochs": int(epochs), "batch_size": int(batch_size), "seed": int(seed),
              "dtype": str(dtype), "lr_schedule": lr_schedule, "hidden": int(hidden)}
    if model_name == "charlm":
        config.update(context=int(context), max_chars=int(max_chars))
    where = select_device(device, comm)
    data = {key: value.to(where)
            for key, value in load_data(model_name, seed, dtype, context, max_chars).items()}
    model = make_model(model_name, hidden, seed, dtype, context).to(where)
    if where.type != "cpu" and comm.rank == 0 and log:
        print(f"{method:7s} on {where} (rank 0; each rank uses its own local device)",
              flush=True)
    broadcast_parameters(model, comm)
    optimizer = methods.make(method, model, comm, options or {})
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
                 if lr_schedule == "cosine" else None)
    batches = GlobalBatches(data["train_y"].shape[0], batch_size, comm, seed=seed)
    records: list[dict[str, Any]] = []
    seconds, step, first_epoch, skip = 0.0, 0, 0, 0
    # a checkpoint of fewer epochs continues to the new count (the run is lengthened)
    driver = Driver(comm, config, CheckpointPolicy(checkpoint_dir, checkpoint_every, keep,
                                                   resume), stop, meta={"method": method},
                    extendable=("epochs",))
    saved = driver.resume(like=lambda: {"model": model.state_dict()})
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
            if scheduler.T_max != epochs:  # lengthened: the cosine of the new epoch count
                scheduler.T_max = epochs
                for group, lr in zip(optimizer.param_groups,
                                     scheduler._get_closed_form_lr(), strict=True):
                    group["lr"] = lr
        _set_rng_state(saved["rng"])
        records, seconds, step = list(saved["records"]), float(saved["seconds"]), saved["step"]
        first_epoch, skip = int(saved["epoch"]), int(saved["batch"])
        if comm.rank == 0 and log:
            print(f"{method:7s} resumed from {driver.resumed_from.path} (step {step}, saved on "
                  f"{driver.resumed_from.nranks} rank(s))", flush=True)
    started = time.perf_counter()

    def state(epoch: int, batch: int) -> dict[str, Any]:
        nonlocal seconds, started
        now = time.perf_counter()
        if batch:  # mid-epoch: the clock up to now goes into the checkpoint
            seconds, started = seconds + now - started, now
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "batch": batch, "step": step, "seconds": seconds,
                "records": records, "rng": _rng_state()}

    if metrics_path is not None and comm.rank == 0:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = TASKS[model_name]
    preempted = False
    for epoch in range(first_epoch, epochs):
        batches.set_epoch(epoch)
        started = time.perf_counter()
        for batch, (rows, weight) in skip_done(batches, skip):
            index = torch.as_tensor(rows, device=where)
            optimizer.zero_grad()
            loss = loss_of(model, data["train_x"][index], data["train_y"][index],
                           task) * weight
            loss.backward()
            if method not in SELF_AVERAGING:
                average_gradients(model.parameters(), comm)
            if method == "mkor_h":
                optimizer.step(loss=loss.item())
            else:
                optimizer.step()
            step += 1
            # The ranks agree on signals after every step (one small reduction) only when
            # a stop flag is installed.
            agreed = driver.agree() if stop is not None else NOTHING_AGREED
            if batch + 1 < len(batches):
                driver.settle(agreed, step, functools.partial(state, epoch, batch + 1),
                              epoch=epoch, batch=batch + 1)
            else:  # the epoch's last step: stop after its evaluation and checkpoint
                preempted = driver.signalled(agreed)
        skip = 0
        if scheduler is not None:
            scheduler.step()
        seconds += time.perf_counter() - started
        record = {"method": method, "epoch": epoch + 1, **evaluate(model, data, task),
                  "seconds": seconds, "steps": step}
        if method == "mkor_h":
            record["switched_at_step"] = optimizer.switch.switched_at
        records.append(record)
        if comm.rank == 0:
            if log:
                metric = (f"test loss {record['test_loss']:.5f}" if "test_loss" in record
                          else f"test accuracy {record['test_accuracy']:.4f}")
                print(f"{method:7s} epoch {epoch + 1:3d}: train loss {record['train_loss']:.5f}"
                      f"  {metric}  {seconds:7.2f} s", flush=True)
            if metrics_path is not None:
                with metrics_path.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
        driver.save(step, state(epoch + 1, 0), epoch=epoch + 1, batch=0)
        if preempted and epoch + 1 < epochs:
            raise driver.preempt(step)
    return {"records": records, "model": model, "optimizer": optimizer}
