"""The GPU path's costs, each as a ratio measured in the same run:

(a) **History product bandwidth**: the two products of an mL-BFGS step over the
    ``(2M, n)`` history, ``V @ g`` and ``c @ V`` (M = 10 pairs, n = 1e8 float32), as the
    fraction of a device-to-device copy's bandwidth (the goal: above 70%); also the whole
    compact-form ``H g`` (``BlockHistory.apply``: the products plus the ``M x M`` host work).
(b) **Step time over SGD** on a ResNet-18-sized network (plain torch, ~11.7M parameters,
    batch 64 at 224x224): one training iteration (forward, backward, step) of
    ``hpcqn.torch.MLBFGS``, ``MKOR`` and ``KFAC`` over one of ``torch.optim.SGD``
    (the goal for mL-BFGS: under 1.1x).
(c) **MKOR factor update vs K-FAC inversion** on the device: one Sherman-Morrison update
    of a ``d x d`` factor inverse against K-FAC's damped inverse and eigendecomposition,
    for d = 256 .. 4096.

Timing: warm-up runs, then the median of repeats, with the device synchronised before and
after each timed call. Prints Markdown tables.

    python benchmarks/bench_gpu.py                       # CUDA (CuPy + torch)
    python benchmarks/bench_gpu.py --device cpu --quick  # tiny sizes on the CPU
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402
from torch import nn  # noqa: E402

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.curvature.block_history import BlockHistory  # noqa: E402
from hpcqn.curvature.kronecker import FactorInverse  # noqa: E402
from hpcqn.optimizers.kfac import damped_eigh, damped_inverse  # noqa: E402


class Device:
    """The array namespace, torch device and synchronisation of one benchmark run."""

    def __init__(self, name: str):
        self.name = name
        if name == "cuda":
            import cupy

            self.xp: ModuleType = cupy
            self.torch = torch.device("cuda")
        else:
            self.xp, self.torch = np, torch.device("cpu")

    def synchronize(self) -> None:
        if self.name == "cuda":
            self.xp.cuda.get_current_stream().synchronize()
            torch.cuda.synchronize()

    def median_seconds(self, fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
        """The median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.synchronize()
            start = time.perf_counter()
            fn()
            self.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def label(self) -> str:
        if self.name == "cuda":
            return f"{torch.cuda.get_device_name()} (CuPy {self.xp.__version__})"
        return "CPU"


# -- (a) history product bandwidth ---------------------------------------------------------
def history_bandwidth(dev: Device, n: int, pairs: int, repeats: int) -> list[tuple[str, ...]]:
    xp = dev.xp
    history = BlockHistory(n, pairs, xp, xp.float32)
    rng = xp.random.default_rng(0) if dev.name == "cpu" else xp.random.RandomState(0)
    for _ in range(pairs):
        s = rng.standard_normal(n, dtype=xp.float32)
        history.push(s, s + 0.1 * rng.standard_normal(n, dtype=xp.float32))
    vectors = history.vectors
    g, out = vectors[0].copy(), xp.empty(n, dtype=xp.float32)
    coeffs = xp.ones(2 * pairs, dtype=xp.float32)
    copy_target = xp.empty_like(vectors)

    def products() -> None:
        _ = vectors @ g
        xp.matmul(coeffs, vectors, out=out)

    product_bytes = 2 * vectors.nbytes + 2 * g.nbytes  # V read twice; g read, out written
    copy_seconds = dev.median_seconds(lambda: xp.copyto(copy_target, vectors), repeats)
    copy_rate = 2 * vectors.nbytes / copy_seconds  # read + write
    rows = [("device-to-device copy of V", f"{copy_seconds * 1e3:.3f}",
             f"{copy_rate / 1e9:.1f}", "1.00")]
    for label, fn in (("V @ g and c @ V", products),
                      ("BlockHistory.apply (whole H g)", lambda: history.apply(g, out))):
        seconds = dev.median_seconds(fn, repeats)
        rate = product_bytes / seconds
        rows.append((label, f"{seconds * 1e3:.3f}", f"{rate / 1e9:.1f}",
                     f"{rate / copy_rate:.2f}"))
    return rows


# -- (b) step time on a ResNet-18-sized network -------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 convolution when the
    shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(width: int = 64, classes: int = 1000) -> nn.Module:
    """The ResNet-18 layout (stem, four stages of two basic blocks, widths ``width`` x
    1, 2, 4, 8, global pooling, a linear classifier): 11.7M parameters at width 64."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = width
    for stage in range(4):
        c_out = width * 2**stage
        for block in range(2):
            layers.append(BasicBlock(c_in, c_out, 2 if stage and not block else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def make_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    comm = hpcqn.serial_comm()
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "mlbfgs":
        return ht.MLBFGS(model.parameters(), comm, lr=0.01)
    if method == "mkor":
        return ht.MKOR(model, comm, lr=0.01)
    return ht.KFAC(model, comm, lr=0.01)


def step_times(dev: Device, batch: int, image: int, width: int, repeats: int
               ) -> list[tuple[str, ...]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=generator).to(dev.torch)
    y = torch.randint(0, 1000, (batch,), generator=generator).to(dev.torch)
    results = {}
    for method in ("sgd", "mlbfgs", "mkor", "kfac"):
        model = resnet18(width).to(dev.torch)
        opt = make_optimizer(method, model)

        def iteration(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        results[method] = dev.median_seconds(iteration, repeats, warmup=3)
    params = sum(p.numel() for p in resnet18(width).parameters())
    return [(method, f"{params / 1e6:.2f}M", f"{seconds * 1e3:.1f}",
             f"{seconds / results['sgd']:.2f}x") for method, seconds in results.items()]


# -- (c) factor update vs inversion --------------------------------------------------------
def factor_costs(dev: Device, sizes: list[int], repeats: int) -> list[tuple[str, ...]]:
    xp, rows = dev.xp, []
    for d in sizes:
        rng = np.random.default_rng(d)
        v = xp.asarray(rng.standard_normal(d).astype(np.float32))
        factor_inverse = FactorInverse(d, xp, np.float32)
        m = rng.standard_normal((d, d)).astype(np.float32)
        factor = xp.asarray(m @ m.T / d)
        update = dev.median_seconds(lambda fi=factor_inverse, v=v: fi.update(v, 0.95, 2.0, 0.9),
                                    repeats)
        inverse = dev.median_seconds(lambda f=factor: damped_inverse(f, 1e-3), repeats)
        eigen = dev.median_seconds(lambda f=factor: damped_eigh(f), repeats)
        rows.append((str(d), f"{update * 1e3:.3f}", f"{inverse * 1e3:.3f}",
                     f"{eigen * 1e3:.3f}", f"{inverse / update:.1f}x",
                     f"{eigen / update:.1f}x"))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    args = parser.parse_args()
    dev = Device(args.device)
    quick = args.quick
    n, pairs = (200_000, 10) if quick else (100_000_000, 10)
    batch, image, width = (2, 32, 8) if quick else (64, 224, 64)
    sizes = [64, 128] if quick else [256, 512, 1024, 2048, 4096]
    repeats = 3 if quick else 20
    extra = f"torch {torch.__version__}, device {dev.label()}"
    print(f"# bench_gpu ({'quick' if quick else 'full'})\n\n{machine(extra)}\n")
    print(f"## (a) history product bandwidth: M = {pairs}, n = {n:.0e} float32\n")
    print(table(("operation", "ms", "GB/s", "fraction of copy"),
                history_bandwidth(dev, n, pairs, repeats)))
    print(f"\n## (b) iteration time over SGD: ResNet-18 layout (width {width}), batch "
          f"{batch} at {image}x{image}\n")
    print(table(("method", "parameters", "ms / iteration", "over SGD"),
                step_times(dev, batch, image, width, max(3, repeats // 2))))
    print("\n## (c) MKOR factor update vs K-FAC inversion (float32)\n")
    print(table(("d", "MKOR update ms", "K-FAC inverse ms", "K-FAC eigh ms",
                 "inverse / update", "eigh / update"), factor_costs(dev, sizes, repeats)))


if __name__ == "__main__":
    main()
