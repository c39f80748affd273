"""Rank-to-device binding (hpcqn.device) and what ``hpcqn info`` says about it.

The local rank: the launchers' variables in their order of trust, the shared-memory split
under mpiexec (2 and 3 ranks on one node give local ranks 0..P-1), CPU results without a
GPU, and the device choice ``local_rank % device_count`` with stand-in CuPy and torch
modules (no GPU here; tests/test_gpu.py binds real devices).
"""

from __future__ import annotations

import sys
import types

import pytest
from test_cli import hpcqn, needs_mpiexec

import hpcqn as hq
from hpcqn import device
from hpcqn.device import LOCAL_RANK_VARS, SPLIT, bind, local_rank

ALL_VARS = [name for pair in LOCAL_RANK_VARS for name in pair if name]


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables: the local rank must come from the communicator."""
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launcher_variables_in_order_of_trust(clean_env):
    values = {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "MPI_LOCALRANKID": "2",
              "PMI_LOCAL_RANK": "1", "SLURM_LOCALID": "0"}
    for name, value in values.items():
        clean_env.setenv(name, value)
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert local_rank(hq.serial_comm()) == device.LocalRank(3, 4, "OMPI_COMM_WORLD_LOCAL_RANK")
    clean_env.delenv("OMPI_COMM_WORLD_LOCAL_RANK")
    assert local_rank(hq.serial_comm()) == device.LocalRank(2, None, "MPI_LOCALRANKID")
    clean_env.delenv("MPI_LOCALRANKID")
    clean_env.setenv("PMI_LOCAL_SIZE", "2")
    assert local_rank(hq.serial_comm()) == device.LocalRank(1, 2, "PMI_LOCAL_RANK")
    clean_env.delenv("PMI_LOCAL_RANK")
    # SLURM_LOCALID last: mpiexec inside an allocation leaves every rank the same value.
    assert local_rank(hq.serial_comm()) == device.LocalRank(0, None, "SLURM_LOCALID")
    clean_env.delenv("SLURM_LOCALID")
    assert local_rank(hq.serial_comm()) == device.LocalRank(0, 1, "single process (no MPI)")


def test_bad_launcher_variable_is_named(clean_env):
    clean_env.setenv("SLURM_LOCALID", "first")
    with pytest.raises(ValueError, match="SLURM_LOCALID must be a non-negative integer"):
        local_rank(hq.serial_comm())


@pytest.mark.mpi
def test_shared_memory_split_gives_local_ranks(comm, clean_env):
    """One node: the split numbers the ranks 0..P-1 in rank order; Hydra's own variable
    (when the launcher set it) agrees."""
    found = local_rank(comm)
    if comm.mpi_comm is None:
        assert found.rank == 0
        return
    assert found == device.LocalRank(comm.rank, comm.size, SPLIT)
    assert sorted(comm.allgather_object(found.rank)) == list(range(comm.size))


@pytest.mark.mpi
def test_launcher_variable_agrees_with_split(comm):
    from_env = local_rank(comm)
    if from_env.source in (SPLIT, "single process (no MPI)"):
        pytest.skip("this launcher sets no local-rank variable")
    assert from_env.rank == comm.node_local()[0]


def test_no_gpu_gives_a_cpu_binding(clean_env):
    clean_env.setattr(device, "device_count", lambda: (0, "CuPy is not installed"))
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")
    binding = bind(hq.serial_comm())
    assert binding.device == "cpu" and binding.index is None and binding.device_count == 0
    assert "no GPU" in binding.reason and "CUDA_VISIBLE_DEVICES is empty" in binding.reason
    assert "device cpu" in binding.describe()


def test_no_gpu_here_for_real(clean_env):
    """On this machine, without mocks: counting devices and binding do not fail."""
    count, why = device.device_count()
    if count:
        pytest.skip("a GPU is present (tests/test_gpu.py covers it)")
    assert why and bind(hq.serial_comm()).device == "cpu"


class _Recorder:
    def __init__(self):
        self.calls: list = []


def _stand_in_modules(clean_env) -> tuple[_Recorder, _Recorder]:
    """CuPy and torch stand-ins that record which device was selected."""
    cupy_calls, torch_calls = _Recorder(), _Recorder()

    class Device:
        def __init__(self, index: int):
            self.index = index

        def use(self):
            cupy_calls.calls.append(self.index)

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device))
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(set_device=torch_calls.calls.append))
    clean_env.setitem(sys.modules, "cupy", fake_cupy)
    clean_env.setattr(device, "_torch_with_cuda", lambda: fake_torch)
    return cupy_calls, torch_calls


@pytest.mark.parametrize(("local", "count", "expected"), [(0, 1, 0), (5, 4, 1), (3, 2, 1)])
def test_bind_selects_local_rank_modulo_devices(clean_env, local, count, expected):
    cupy_calls, torch_calls = _stand_in_modules(clean_env)
    clean_env.setattr(device, "device_count", lambda: (count, "CuPy"))
    clean_env.setenv("SLURM_LOCALID", str(local))
    clean_env.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(7 - i) for i in range(count)))
    binding = bind(hq.serial_comm())
    assert (binding.device, binding.index) == (f"cuda:{expected}", expected)
    assert cupy_calls.calls == [expected] and torch_calls.calls == [expected]
    assert binding.visible_devices == ",".join(str(7 - i) for i in range(count))
    assert f"local rank {local} % {count}" in binding.reason


@needs_mpiexec
@pytest.mark.parametrize("aware", ["0", "1"])
def test_info_under_mpiexec_reports_awareness_and_binding(monkeypatch, aware):
    import test_cli

    monkeypatch.setitem(test_cli.ENV, "HPCQN_CUDA_AWARE", aware)
    out = hpcqn("info", ranks=2)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    awareness = next(line for line in lines if line.startswith("CUDA-aware MPI"))
    expected = ("device buffers go to MPI directly" if aware == "1"
                else "device buffers are staged through host buffers")
    assert expected in awareness and f"HPCQN_CUDA_AWARE={aware}" in awareness
    for rank in range(2):
        line = next(line for line in lines if line.startswith(f"rank {rank} "))
        assert f"local rank {rank} of 2" in line
        assert ("device cpu" in line) or ("device cuda:" in line)


def test_training_device_selection_without_a_gpu(clean_env):
    """``device`` of a training run: "cpu" and "auto" train on the CPU here, "cuda" is
    an error that says why, anything else is rejected."""
    torch = pytest.importorskip("torch")
    from hpcqn.experiments.training import select_device

    comm = hq.serial_comm()
    clean_env.setattr(device, "device_count", lambda: (0, "CuPy is not installed"))
    assert select_device("cpu", comm) == torch.device("cpu")
    assert select_device("auto", comm) == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda' asked for, but rank 0: no GPU"):
        select_device("cuda", comm)
    with pytest.raises(ValueError, match="device must be one of"):
        select_device("gpu0", comm)


def test_training_device_with_a_device_torch_cannot_use(clean_env):
    """A GPU that CuPy sees but torch cannot use (a CPU build of torch): "auto" falls
    back to the CPU and "cuda" names the reason."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here")
    from hpcqn.experiments.training import select_device

    _stand_in_modules(clean_env)
    clean_env.setattr(device, "device_count", lambda: (1, "CuPy"))
    comm = hq.serial_comm()
    assert select_device("auto", comm) == torch.device("cpu")
    with pytest.raises(ValueError, match="rank 0: torch has no CUDA"):
        select_device("cuda", comm)


@pytest.mark.parametrize(("in_file", "in_env"), [("cuda", None), ("cpu", "cuda")])
def test_job_asking_for_cuda_without_one_is_a_job_error(tmp_path, clean_env, in_file,
                                                        in_env):
    """``[train] device = "cuda"``, or ``HPCQN_DEVICE=cuda`` over a job file's "cpu",
    on a machine without a GPU: a job error naming the reason."""
    pytest.importorskip("torch")
    from hpcqn.experiments.jobs import JobError, run_job

    if device.device_count()[0]:
        pytest.skip("a GPU is present")
    clean_env.delenv("HPCQN_DEVICE", raising=False)  # tests/conftest.py sets cpu
    if in_env is not None:
        clean_env.setenv("HPCQN_DEVICE", in_env)
    job = tmp_path / "gpu.toml"
    job.write_text('[job]\nkind = "torch"\n[model]\nname = "mlp"\n'
                   f'[train]\nepochs = 1\ndevice = "{in_file}"\n[methods.sgd]\nlr = 0.1\n')
    with pytest.raises(JobError, match="method 'sgd': device 'cuda' asked for"):
        run_job(job, hq.serial_comm(), output=str(tmp_path / "run" / "metrics.json"))
