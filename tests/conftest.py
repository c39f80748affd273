"""Shared fixtures. MPI tests (``@pytest.mark.mpi``) run under
``mpiexec -n N python -m pytest --with-mpi -m mpi`` and, those that use no mpi4py of
their own, under ``torchrun --nproc_per_node N -m pytest --with-mpi -m mpi`` (over
torch.distributed with gloo); the rest run serially."""

from __future__ import annotations

import os

# One thread per rank: several ranks share two cores in CI.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Jobs started by the tests (``hpcqn run`` in subprocesses) train on the CPU even where a
# GPU exists: the tests compare runs exactly. tests/test_gpu.py asks for CUDA explicitly.
os.environ.setdefault("HPCQN_DEVICE", "cpu")

import pytest  # noqa: E402

import hpcqn  # noqa: E402

if os.environ.get("TORCHELASTIC_RUN_ID"):
    # Under torchrun the MPI-marked tests run over torch.distributed (gloo): the world
    # communicator of hpcqn is then the default process group.
    import torch.distributed  # noqa: E402

    torch.distributed.init_process_group("gloo")


@pytest.fixture
def comm() -> hpcqn.Communicator:
    """The world communicator (one rank in a serial run), its counters reset: it is the
    process's one communicator, shared by every test."""
    c = hpcqn.get_comm()
    c.reset_counters()
    return c
