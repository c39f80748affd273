"""Per-layer factor-update time of MKOR (``hpcqn.curvature.kronecker.FactorInverse``)
against K-FAC-style alternatives on the same ``d x d`` factor.

For each size ``d`` (default 256, 512, 1024, 2048, 4096), all measured in one run of this
script (one process, one BLAS thread):

* **MKOR update**: one ``FactorInverse.update(v, gam=0.95, eps_stab=2.0, zeta=0.9)`` (the
  norm-based stabiliser check, plus the stabiliser when it fires, then the rank-1
  Sherman-Morrison step and the symmetrisation), with float32 storage and with bfloat16
  storage (arithmetic in float32 both times; bfloat16 adds the decode and encode of
  ``X``). Each factor is first warmed with 20 untimed updates so that ``X`` is a
  realistic SPD matrix; ``v`` is standard normal scaled by ``1/sqrt(d)``.
* **explicit inverse**: ``np.linalg.inv(F)`` of a float32 SPD ``F = B B^T / d + 1e-3 I``
  (built once, untimed).
* **Cholesky inverse**: LAPACK ``spotrf`` + ``spotri`` through ``scipy.linalg.lapack``,
  plus filling the lower triangle (what ``torch.cholesky_inverse`` does).
* **eigendecomposition**: ``np.linalg.eigh(F)`` (K-FAC/KAISA's eigen variant).

Times are medians of several repeats with ``time.perf_counter`` (fewer repeats at large
``d``; the repeats used are printed). Every operation is timed back-to-back, so at small
``d`` the MKOR factor is warm in cache. Before the timings, one ``update`` is checked in
float64 (untimed) against ``inv(gam inv(X_old) + (1 - gam) v v^T)``; the script aborts
if the relative error is not below 1e-8.

Run from the repository root (about 1 minute on two cores; ``--quick`` a few seconds)::

    python benchmarks/bench_mkor_factors.py [--quick]
    python benchmarks/bench_mkor_factors.py --sizes 256 1024 --json /tmp/mkor.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process, set before NumPy loads its BLAS.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Import hpcqn from this checkout, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg.lapack as lapack  # noqa: E402
from common import machine  # noqa: E402

from hpcqn.curvature.kronecker import FactorInverse  # noqa: E402

GAM, EPS_STAB, ZETA = 0.95, 2.0, 0.9
WARM_UPDATES = 20
CHECK_D = 256
CHECK_TOL = 1e-8
SIZES = (256, 512, 1024, 2048, 4096)
QUICK_SIZES = (256, 512, 1024)


@dataclass
class Repeats:
    mkor: int
    inverse: int
    eigh: int


@dataclass
class Row:
    d: int
    mkor_float32_s: float
    mkor_bfloat16_s: float
    inverse_s: float
    cholesky_s: float
    eigh_s: float
    repeats: Repeats
    stabiliser_fired_float32: int  # among the timed updates
    stabiliser_fired_bfloat16: int


def repeats_for(d: int, quick: bool) -> Repeats:
    """Repeats per operation: many for the cheap MKOR update, few for O(d^3) at large d."""
    if quick:
        return Repeats(mkor=3, inverse=3, eigh=3 if d <= 512 else 1)
    if d <= 512:
        return Repeats(mkor=50, inverse=10, eigh=5)
    if d <= 1024:
        return Repeats(mkor=30, inverse=5, eigh=3)
    if d <= 2048:
        return Repeats(mkor=20, inverse=3, eigh=2)
    return Repeats(mkor=10, inverse=2, eigh=1)


def median_seconds(fn: Callable[[], Any], repeats: int, warm: bool) -> float:
    """Median over ``repeats`` calls of ``fn`` (one untimed call first when ``warm``)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_vectors(rng: np.random.Generator, count: int, d: int, dtype: Any) -> list[Any]:
    return [(rng.standard_normal(d) / math.sqrt(d)).astype(dtype) for _ in range(count)]


def check_update() -> list[float]:
    """One float64 update against the exact inverse, from a fresh identity (the stabiliser
    stays off since max|X| = 1 <= eps_stab) and from a warmed X (stabiliser disabled);
    returns the relative errors (Frobenius), exits when one is >= CHECK_TOL."""
    rng = np.random.default_rng(1)
    errors = []
    for warm in (0, 5):
        factor = FactorInverse(CHECK_D, np, np.float64)
        eps_stab = EPS_STAB if warm == 0 else math.inf
        for v in random_vectors(rng, warm, CHECK_D, np.float64):
            factor.update(v, gam=GAM, eps_stab=eps_stab, zeta=ZETA)
        x_old = factor.matrix().copy()
        assert float(np.max(np.abs(x_old))) <= eps_stab
        v = random_vectors(rng, 1, CHECK_D, np.float64)[0]
        fired = factor.update(v, gam=GAM, eps_stab=eps_stab, zeta=ZETA)
        expected = np.linalg.inv(GAM * np.linalg.inv(x_old) + (1 - GAM) * np.outer(v, v))
        error = float(np.linalg.norm(factor.matrix() - expected) / np.linalg.norm(expected))
        errors.append(error)
        if fired or not error < CHECK_TOL:
            sys.exit(f"correctness check FAILED at d={CHECK_D} (float64, {warm} warm-up "
                     f"updates): relative error {error:.3e} (tolerance {CHECK_TOL:g}), "
                     f"stabiliser fired: {fired}")
    return errors


def spd_matrix(rng: np.random.Generator, d: int) -> np.ndarray:
    """``F = B B^T / d + 1e-3 I`` in float32."""
    b = rng.standard_normal((d, d), dtype=np.float32)
    f = b @ b.T
    f *= np.float32(1.0 / d)
    f.reshape(-1)[:: d + 1] += np.float32(1e-3)
    return f


def cholesky_inverse(f: np.ndarray) -> np.ndarray:
    """``F^-1`` by ``spotrf`` + ``spotri``, the lower triangle filled from the upper."""
    c, info = lapack.spotrf(f, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"spotrf failed with info={info}")
    inverse, info = lapack.spotri(c, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"spotri failed with info={info}")
    lower = np.tril_indices(f.shape[0], -1)
    inverse[lower] = inverse.T[lower]
    return inverse


def time_mkor(rng: np.random.Generator, d: int, storage: str, repeats: int) -> tuple[float, int]:
    """Median seconds of one update after the warm-up, and how often the stabiliser fired
    in the timed updates."""
    factor = FactorInverse(d, np, np.float32, storage)
    for v in random_vectors(rng, WARM_UPDATES, d, np.float32):
        factor.update(v, gam=GAM, eps_stab=EPS_STAB, zeta=ZETA)
    fired_before = factor.stabilised
    vectors = random_vectors(rng, repeats, d, np.float32)
    times = []
    for v in vectors:
        start = time.perf_counter()
        factor.update(v, gam=GAM, eps_stab=EPS_STAB, zeta=ZETA)
        times.append(time.perf_counter() - start)
    if not np.all(np.isfinite(factor.matrix())):
        sys.exit(f"MKOR factor ({storage}, d={d}) is not finite after the timed updates")
    return statistics.median(times), factor.stabilised - fired_before


def measure(d: int, quick: bool) -> Row:
    rng = np.random.default_rng(d)
    reps = repeats_for(d, quick)
    warm = d <= 1024  # one untimed call first, where it is cheap
    mkor32, fired32 = time_mkor(rng, d, "float32", reps.mkor)
    mkor16, fired16 = time_mkor(rng, d, "bfloat16", reps.mkor)
    f = spd_matrix(rng, d)
    if d <= 1024:  # the alternatives agree (untimed)
        reference = np.linalg.inv(f.astype(np.float64))
        for name, candidate in (("inv", np.linalg.inv(f)), ("cholesky", cholesky_inverse(f))):
            error = float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))
            if not error < 1e-2:
                sys.exit(f"{name} inverse at d={d} has relative error {error:.2e}")
    inverse = median_seconds(lambda: np.linalg.inv(f), reps.inverse, warm)
    cholesky = median_seconds(lambda: cholesky_inverse(f), reps.inverse, warm)
    eigh = median_seconds(lambda: np.linalg.eigh(f), reps.eigh, warm)
    return Row(d, mkor32, mkor16, inverse, cholesky, eigh, reps, fired32, fired16)


def print_table(rows: list[Row]) -> None:
    print("| d | MKOR update ms (float32 storage) | MKOR update ms (bfloat16 storage) "
          "| inverse ms | Cholesky inverse ms | eigh ms | inverse / MKOR "
          "| Cholesky / MKOR | eigh / MKOR | bfloat16 / float32 MKOR |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.d} | {r.mkor_float32_s * 1e3:.3f} | {r.mkor_bfloat16_s * 1e3:.3f} "
              f"| {r.inverse_s * 1e3:.1f} | {r.cholesky_s * 1e3:.1f} | {r.eigh_s * 1e3:.1f} "
              f"| {r.inverse_s / r.mkor_float32_s:.1f} "
              f"| {r.cholesky_s / r.mkor_float32_s:.1f} "
              f"| {r.eigh_s / r.mkor_float32_s:.1f} "
              f"| {r.mkor_bfloat16_s / r.mkor_float32_s:.2f} |")


def print_repeats(rows: list[Row]) -> None:
    print("| d | MKOR updates timed (each storage) | inverse / Cholesky repeats "
          "| eigh repeats | stabiliser fired (float32 / bfloat16) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.d} | {r.repeats.mkor} | {r.repeats.inverse} | {r.repeats.eigh} "
              f"| {r.stabiliser_fired_float32} / {r.stabiliser_fired_bfloat16} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"d = {', '.join(map(str, QUICK_SIZES))} and 1-3 repeats "
                             f"(a smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="factor sizes d (default: "
                             f"{' '.join(map(str, SIZES))})")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    start = time.perf_counter()
    errors = check_update()
    rows = []
    for d in sizes:
        print(f"d = {d}", file=sys.stderr, flush=True)
        rows.append(measure(d, args.quick))
    wall = time.perf_counter() - start
    description = machine()

    print(f"## MKOR factor update vs K-FAC-style inversion{' (--quick)' if args.quick else ''}"
          f"\n")
    print(f"Machine: {description}\n")
    print(f"Correctness (untimed, float64, d = {CHECK_D}): one update against "
          f"inv(gam inv(X_old) + (1 - gam) v v^T), relative error {errors[0]:.2e} from the "
          f"identity and {errors[1]:.2e} from a factor warmed with 5 updates (tolerance "
          f"{CHECK_TOL:g}, stabiliser off).\n")
    print(f"MKOR: FactorInverse.update(v, gam={GAM}, eps_stab={EPS_STAB}, zeta={ZETA}) after "
          f"{WARM_UPDATES} untimed warm-up updates, v ~ N(0, I)/sqrt(d), arithmetic float32; "
          f"one update = stabiliser check (+ stabiliser when max|X| > eps_stab) + X v + "
          f"rank-1 update + symmetrisation, O(d^2). Alternatives on a float32 SPD "
          f"F = B B^T/d + 1e-3 I: np.linalg.inv, LAPACK spotrf + spotri (lower triangle "
          f"filled), np.linalg.eigh, all O(d^3), so the ratios are expected to grow about "
          f"linearly with d. Median of the repeats below, time.perf_counter, one process, "
          f"one BLAS thread; ratios are against the float32-storage MKOR update.\n")
    print_table(rows)
    print()
    print_repeats(rows)
    print(f"\nTotal wall time of this run: {wall:.1f} s (including warm-ups and the building "
          f"of F).")
    if args.json:
        report = {
            "machine": description, "quick": args.quick, "sizes": sizes,
            "gam": GAM, "eps_stab": EPS_STAB, "zeta": ZETA, "warm_updates": WARM_UPDATES,
            "check_relative_errors": errors, "wall_seconds": wall,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
