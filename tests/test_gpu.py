"""The GPU path on a real device: CuPy runs equal the NumPy runs on the same inputs
(float64 to 1e-10, float32 to 1e-5), the torch bridge on CUDA tensors equals the CPU
run, checkpoints of device arrays round-trip, and two ranks share one GPU.

Run with ``python -m pytest -m gpu``; every test skips where CuPy or a CUDA device is
absent (they are collected, then skipped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from stops import StopAt

import hpcqn
from hpcqn import backend
from hpcqn.layout import BlockLayout
from hpcqn.optimizers.kfac import KFAC
from hpcqn.optimizers.mkor import MKOR

ROOT = Path(__file__).resolve().parents[1]


def _cuda_devices() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CuPy missing, or no driver or device
        return 0


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_cuda_devices() == 0, reason="needs CuPy and a CUDA GPU")]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


@pytest.fixture
def cp():
    import cupy

    return cupy


def close(device_result, host_reference, dtype) -> None:
    assert backend.is_cupy_array(device_result), "the result left the device"
    got = backend.to_host(device_result)
    scale = max(1.0, float(np.max(np.abs(host_reference))))
    np.testing.assert_allclose(got, host_reference, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * scale)


def rosenbrock(x):
    """Extended Rosenbrock, written once against the array's namespace."""
    xp = backend.namespace(x)
    odd, even = x[0::2], x[1::2]
    t, u = even - odd * odd, 1.0 - odd
    g = xp.empty_like(x)
    g[0::2] = -400.0 * odd * t - 2.0 * u
    g[1::2] = 200.0 * t
    return float(100.0 * t @ t + u @ u), g


@pytest.mark.parametrize("dtype", DTYPES)
def test_minimize_on_cupy_equals_numpy(cp, dtype):
    x0 = np.tile(np.array([-1.2, 1.0]), 50).astype(dtype)
    options = {"maxiter": 40, "gtol": 0.0}
    host = hpcqn.minimize(rosenbrock, x0.copy(), hpcqn.serial_comm(), options=options)
    device = hpcqn.minimize(rosenbrock, cp.asarray(x0), hpcqn.serial_comm(), options=options)
    assert device.nit == host.nit
    close(device.x, host.x, dtype)


def block_quadratic(dtype, blocks=(40, 24, 36)):
    rng = np.random.default_rng(0)
    n = sum(blocks)
    a = np.zeros((n, n))
    start = 0
    for size in blocks:
        q = rng.standard_normal((size, size))
        a[start : start + size, start : start + size] = q @ q.T / size + 0.5 * np.eye(size)
        start += size
    return a.astype(dtype), rng.standard_normal(n).astype(dtype), list(blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlbfgs_core_on_cupy_equals_numpy(cp, dtype):
    a, b, blocks = block_quadratic(dtype)
    runs = []
    for xp in (np, cp):
        opt = hpcqn.MLBFGS(BlockLayout.from_sizes(blocks, 1), hpcqn.serial_comm(), lr=0.2,
                           period=2, history=5)
        am, bm, x = xp.asarray(a), xp.asarray(b), xp.zeros(b.size, dtype=dtype)
        for _ in range(30):
            opt.step(x, am @ x - bm)
        runs.append(x)
    close(runs[1], runs[0], dtype)


def layer_statistics(rng, shapes, dtype, kind):
    if kind == "mkor":
        return [(rng.standard_normal(i).astype(dtype), rng.standard_normal(o).astype(dtype))
                for o, i in shapes]
    stats = []
    for o, i in shapes:
        a, g = rng.standard_normal((2 * i, i)), rng.standard_normal((2 * o, o))
        stats.append(((a.T @ a / (2 * i)).astype(dtype), (g.T @ g / (2 * o)).astype(dtype)))
    return stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mkor", "kfac-inverse", "kfac-eigen"])
def test_layerwise_cores_on_cupy_equal_numpy(cp, dtype, kind):
    """MKOR's Sherman-Morrison updates and K-FAC's inverses/eigendecompositions, then the
    preconditioned gradients, on CuPy and NumPy from the same statistics."""
    shapes = [(64, 96), (10, 65)]
    results = []
    for xp in (np, cp):
        rng = np.random.default_rng(1)
        if kind == "mkor":
            opt = MKOR(shapes, hpcqn.serial_comm(), factor_decay=0.8, dtype=dtype, xp=xp)
        else:
            opt = KFAC(shapes, hpcqn.serial_comm(), method=kind.split("-")[1], damping=0.1,
                       dtype=dtype, xp=xp)
        for _ in range(3):
            stats = layer_statistics(rng, shapes, dtype, "mkor" if kind == "mkor" else "kfac")
            opt.update_factors([tuple(xp.asarray(s) for s in item) for item in stats])
        if kind != "mkor":
            opt.update_inverses()
        grads = [xp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
        results.append(opt.precondition(grads))
    for device, host in zip(results[1], results[0], strict=True):
        close(device, host, dtype)


@pytest.mark.parametrize("method", ["mlbfgs", "mkor", "kfac"])
def test_torch_bridge_on_cuda_equals_cpu(method):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    import hpcqn.torch as ht
    from hpcqn.experiments.training import make_model

    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.standard_normal((64, 1, 8, 8)))
    y = torch.as_tensor(rng.integers(0, 10, 64))
    finals = []
    for device in ("cpu", "cuda"):
        model = make_model("cnn", dtype=torch.float64).to(device)
        if method == "mlbfgs":
            opt = ht.MLBFGS(model.parameters(), hpcqn.serial_comm(), lr=0.05, period=2)
        elif method == "mkor":
            opt = ht.MKOR(model, hpcqn.serial_comm(), lr=0.05, factor_freq=2)
        else:
            opt = ht.KFAC(model, hpcqn.serial_comm(), lr=0.05, inv_freq=2, damping=0.1)
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        finals.append([p.detach().cpu().numpy() for p in model.parameters()])
    for gpu, cpu in zip(finals[1], finals[0], strict=True):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-10, atol=1e-10)


def test_checkpoint_of_device_arrays_round_trips(cp, tmp_path):
    """Device arrays are saved and read back exactly; an mL-BFGS state saved from CuPy
    and loaded into a fresh optimizer continues bitwise as the uninterrupted run."""
    from hpcqn import checkpoint

    a, b, blocks = block_quadratic(np.float64)
    am, bm = cp.asarray(a), cp.asarray(b)
    comm = hpcqn.serial_comm()

    def make():
        return hpcqn.MLBFGS(BlockLayout.from_sizes(blocks, 1), comm, lr=0.2, period=2)

    opt, x = make(), cp.zeros(b.size)
    for _ in range(6):
        opt.step(x, am @ x - bm)
    checkpoint.save(tmp_path, {"x": x, "optimizer": opt.state_dict(),
                               "float32": cp.arange(5, dtype=cp.float32)}, comm, step=6)
    for _ in range(6):
        opt.step(x, am @ x - bm)
    state = checkpoint.load(tmp_path, comm).state()
    assert state["float32"].dtype == np.float32
    np.testing.assert_array_equal(backend.to_host(state["float32"]), np.arange(5))
    fresh, x2 = make(), cp.asarray(state["x"])
    fresh.load_state_dict(state["optimizer"])
    for _ in range(6):
        fresh.step(x2, am @ x2 - bm)
    assert bool(cp.all(x2 == x))


TWO_RANKS = textwrap.dedent("""
    import numpy as np, cupy as cp, hpcqn
    from hpcqn.device import bind
    from hpcqn.layout import BlockLayout
    comm = hpcqn.get_comm()
    binding = bind(comm)
    assert binding.device == f"cuda:{comm.rank % binding.device_count}", binding
    assert cp.cuda.Device().id == binding.index
    rng = np.random.default_rng(comm.rank)
    a = np.diag(np.linspace(1.0, 10.0, 60))
    b = rng.standard_normal(60)
    finals = []
    for xp in (np, cp):
        opt = hpcqn.MLBFGS(BlockLayout.from_sizes([20, 25, 15], comm.size), comm, lr=0.2,
                           period=2)
        am, bm, x = xp.asarray(a), xp.asarray(b), xp.zeros(60)
        for _ in range(20):
            opt.step(x, am @ x - bm)
        finals.append(hpcqn.backend.to_host(x))
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-10, atol=1e-12)
    total = comm.allreduce(cp.full(7, comm.rank + 1.0))
    assert isinstance(total, cp.ndarray) and float(total[0]) == 3.0
    print("rank", comm.rank, "ok on", binding.device, flush=True)
""")


@pytest.mark.parametrize("aware", ["0", None])
def test_two_ranks_share_one_gpu(aware):
    """``mpiexec -n 2`` on one node: both ranks bind (to the same GPU when there is
    one), their CuPy runs equal their NumPy runs, and device collectives work on the
    staging path (aware "0") and on the path the MPI library reports (None)."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HPCQN_CUDA_AWARE", None)
    if aware is not None:
        env["HPCQN_CUDA_AWARE"] = aware
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", TWO_RANKS], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok on cuda:") == 2



@pytest.mark.parametrize("method", ["mlbfgs", "mkor", "kfac", "sgd"])
def test_training_on_cuda_equals_cpu_and_resumes_across_devices(method, tmp_path):
    """``train(device="cuda")`` (what ``hpcqn run`` does on a GPU node) gives the CPU
    run's losses (float64); a run stopped on the GPU resumes on the CPU and ends where
    the unbroken CPU run ends."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from hpcqn.experiments.training import train
    from hpcqn.signals import Preempted

    comm = hpcqn.serial_comm()
    options = {"lr": 0.05, "damping": 0.1} if method == "kfac" else {"lr": 0.05}

    def run(where, **extra):
        return train(method, comm, "cnn", options, epochs=2, batch_size=128,
                     dtype=torch.float64, log=False, device=where, **extra)

    cpu, gpu = run("cpu"), run("cuda")
    assert next(gpu["model"].parameters()).is_cuda
    np.testing.assert_allclose([r["train_loss"] for r in gpu["records"]],
                               [r["train_loss"] for r in cpu["records"]], rtol=1e-8)
    with pytest.raises(Preempted):
        run("cuda", checkpoint_dir=tmp_path, stop=StopAt(7))
    resumed = run("cpu", checkpoint_dir=tmp_path)
    np.testing.assert_allclose(resumed["records"][-1]["train_loss"],
                               cpu["records"][-1]["train_loss"], rtol=1e-8)
