"""Which GPU a rank uses: its local rank on the node, modulo the devices it can see.

The local rank comes from the launcher when it says (the first of :data:`LOCAL_RANK_VARS`
that is set), else from an MPI shared-memory split of the communicator. The launchers'
own per-rank variables come before Slurm's: a rank started by ``mpiexec`` inside a
Slurm allocation inherits ``SLURM_LOCALID`` from the one task (``srun``) that started
the node's launcher, the same value on every rank, whereas ``mpiexec`` sets its own
variable for each rank. Under ``srun`` only ``SLURM_LOCALID`` (or Open MPI's) is set, and
is right.

:func:`bind` selects device ``local_rank % device_count`` of those visible to the process
(``CUDA_VISIBLE_DEVICES`` is taken as given: with one device per task, as the
``slurm/`` GPU template asks, every rank selects its device 0), for CuPy and for torch
when it has CUDA. Without a GPU it returns a CPU binding and changes nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from .comm import get_comm

# (local rank, local size) variables, in the order they are trusted.
LOCAL_RANK_VARS = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),  # Open MPI
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH and Intel MPI (Hydra)
    ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),  # PMI launchers (Cray PALS, MVAPICH)
    ("SLURM_LOCALID", None),  # srun
)
SPLIT = "MPI shared-memory split"


@dataclass(frozen=True)
class LocalRank:
    """This rank's index among the ranks on its node, how many there are (None when the
    launcher does not say), and where that came from (a variable's name, or the split)."""

    rank: int
    size: int | None
    source: str


@dataclass(frozen=True)
class Binding:
    """What :func:`bind` chose: ``device`` is ``"cuda:N"`` (N among the visible devices)
    or ``"cpu"``; ``reason`` says why, in words."""

    device: str
    index: int | None
    device_count: int
    local: LocalRank
    visible_devices: str | None
    reason: str

    def describe(self) -> str:
        """One line: the device, the local rank and its source, and the reason."""
        size = "" if self.local.size is None else f" of {self.local.size}"
        return (f"local rank {self.local.rank}{size} ({self.local.source}), device "
                f"{self.device}: {self.reason}")


def local_rank(comm: Any = None) -> LocalRank:
    """This rank's local rank from the launcher's variables, else from a shared-memory
    split of ``comm`` (a collective: then every rank of ``comm`` must call it)."""
    for rank_var, size_var in LOCAL_RANK_VARS:
        value = os.environ.get(rank_var)
        if value is None:
            continue
        rank = _nonnegative(rank_var, value)
        size_value = os.environ.get(size_var) if size_var else None
        size = None if size_value is None else _nonnegative(size_var, size_value)
        return LocalRank(rank, size, rank_var)
    c = get_comm(comm)
    if c.mpi_comm is None:
        return LocalRank(0, 1, "single process (no MPI)")
    rank, size = c.node_local()
    return LocalRank(rank, size, SPLIT)


def _nonnegative(name: str, value: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def device_count() -> tuple[int, str]:
    """How many CUDA devices this process sees (CuPy's count, else torch's), and which
    library said so or why there are none."""
    if importlib.util.find_spec("cupy") is not None:
        try:
            cupy = importlib.import_module("cupy")
            return int(cupy.cuda.runtime.getDeviceCount()), "CuPy"
        except Exception as exc:  # CuPy installed without a driver or a device
            reason = f"CuPy sees no device ({type(exc).__name__}: {exc})"
    else:
        reason = "CuPy is not installed"
    torch = _torch_with_cuda()
    if torch is not None:
        return int(torch.cuda.device_count()), "torch"
    return 0, f"{reason}; torch has no CUDA device"


def _torch_with_cuda() -> Any | None:
    """The torch module when it is installed and sees a CUDA device, else None."""
    if importlib.util.find_spec("torch") is None:
        return None
    torch = importlib.import_module("torch")
    return torch if torch.cuda.is_available() else None


def bind(comm: Any = None) -> Binding:
    """Make device ``local_rank % device_count`` this process's current device (CuPy's,
    and torch's when torch has CUDA) and return the choice; a CPU binding without a GPU.
    Collective when the local rank needs the shared-memory split (see :func:`local_rank`)."""
    local = local_rank(comm)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count, source = device_count()
    if count == 0:
        why = "no GPU: arrays stay on the host (NumPy)"
        if visible is not None and not visible.strip():
            why += " (CUDA_VISIBLE_DEVICES is empty)"
        return Binding("cpu", None, 0, local, visible, f"{why}; {source}")
    index = local.rank % count
    if source == "CuPy":
        importlib.import_module("cupy").cuda.Device(index).use()
    torch = _torch_with_cuda()
    if torch is not None:
        torch.cuda.set_device(index)
    shown = "all" if visible is None else f"CUDA_VISIBLE_DEVICES={visible}"
    reason = (f"local rank {local.rank} % {count} visible device(s) ({shown}, counted by "
              f"{source})")
    return Binding(f"cuda:{index}", index, count, local, visible, reason)
