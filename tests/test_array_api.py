"""The model-agnostic numerical kernels under a strict array-API namespace
(``array_api_strict``): they use nothing NumPy-only, and give the NumPy run's numbers
(float64, 1e-12).

Covered (run here on ``array_api_strict`` arrays):

- ``backend.namespace`` (recognises ``__array_namespace__``), ``astype``, ``norm``,
  ``matmul_into``, ``rank1_update`` and ``symmetrize`` (their generic branches);
- ``curvature.block_history.BlockHistory``: ``push`` (the three products) and ``apply``
  (the compact-form ``H g``: ``V @ g`` and ``c @ V``), with the ring buffer wrapping;
- ``curvature.gram_history.GramHistory``: ``local_products``, ``absorb``, the two-loop
  ``direction_coefficients`` and ``combine`` (``d = sum_j delta_j b_j``);
- ``curvature.kronecker``: ``stabilise``, ``sherman_morrison``, ``FactorInverse.update``
  and ``matrix`` in float32/float64 storage, ``precondition``;
- ``optimizers.kfac``: ``damped_inverse`` and ``damped_eigh`` (``xp.linalg.inv`` and
  ``xp.linalg.eigh``), ``KFAC.update_factors``, ``update_inverses`` and ``precondition``
  in both forms (redundant placement, serial communicator);
- ``optimizers.mkor.MKOR.update_factors`` and ``precondition`` (redundant, serial).

NumPy/CuPy-specific (not run here; each has a generic branch or stays NumPy/CuPy-only):

- the fast paths themselves: BLAS ``ger``/``axpy`` for contiguous NumPy arrays, the
  cache-tiled NumPy ``symmetrize``, LAPACK Cholesky (``potrf``/``potri``) in
  ``damped_inverse``, the strided diagonal view in ``kronecker``, ``out=`` products;
- ``GramHistory.pair_rows`` as WRITABLE views (the L-BFGS optimizer writes ``s`` and
  ``y`` through them; the standard does not promise views, so these tests write rows by
  index);
- bfloat16/float16 factor storage (``.view`` bit casts and float16 are not required by
  the standard), ``all_finite``'s ``np.errstate``, DLPack import, host staging in the
  communicator, checkpoint I/O;
- the optimizers' statistics reductions (MPI buffers are NumPy or CUDA arrays).
"""

from __future__ import annotations

import numpy as np
import pytest

import hpcqn
from hpcqn import backend
from hpcqn.curvature.block_history import BlockHistory
from hpcqn.curvature.gram_history import GramHistory
from hpcqn.curvature.kronecker import FactorInverse, precondition, sherman_morrison, stabilise
from hpcqn.optimizers.kfac import KFAC, damped_eigh, damped_inverse
from hpcqn.optimizers.mkor import MKOR

xps = pytest.importorskip("array_api_strict")

RTOL = 1e-12


def strict(a: np.ndarray):
    return xps.asarray(np.array(a, dtype=np.float64))


def close(result, reference, rtol: float = RTOL) -> None:
    assert backend.namespace(result) is xps, "the kernel left the strict namespace"
    got = np.asarray(result)
    scale = max(1.0, float(np.max(np.abs(reference))))
    np.testing.assert_allclose(got, reference, rtol=rtol, atol=rtol * scale)


def spd(rng: np.random.Generator, d: int) -> np.ndarray:
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.5 * np.eye(d)


def test_namespace_recognises_array_api_arrays():
    a = strict(np.ones(3))
    assert backend.namespace(a) is xps and backend.namespace(a, a) is xps
    with pytest.raises(TypeError, match="mix arrays"):
        backend.namespace(a, np.ones(3))
    assert backend.dtype_name(xps.float32, xps) == "float32"
    assert backend.astype(a, xps.float32).dtype == xps.float32
    assert backend.norm(strict(np.array([[3.0, 0.0], [0.0, 4.0]]))) == 5.0


def test_generic_helpers_match_numpy():
    rng = np.random.default_rng(0)
    x, u = rng.standard_normal((6, 6)), rng.standard_normal(6)
    sx = strict(x)
    backend.rank1_update(sx, -0.3, strict(u))
    close(sx, x - 0.3 * np.outer(u, u))
    backend.symmetrize(sx)
    reference = x - 0.3 * np.outer(u, u)
    close(sx, (reference + reference.T) / 2)
    out = strict(np.zeros(6))
    assert backend.matmul_into(sx, strict(u), out) is out
    close(out, (reference + reference.T) / 2 @ u)


def test_block_history_product():
    rng = np.random.default_rng(1)
    n, m = 40, 4
    histories = BlockHistory(n, m, np, np.float64), BlockHistory(n, m, xps, xps.float64)
    for _ in range(m + 2):  # the ring buffer wraps
        s = rng.standard_normal(n)
        y = s + 0.1 * rng.standard_normal(n)
        histories[0].push(s, y)
        histories[1].push(strict(s), strict(y))
        np.testing.assert_allclose(histories[1].sy, histories[0].sy, rtol=RTOL)
        np.testing.assert_allclose(histories[1].yy, histories[0].yy, rtol=RTOL)
    assert histories[1].order == histories[0].order
    g = rng.standard_normal(n)
    reference = histories[0].apply(g, np.empty(n))
    close(histories[1].apply(strict(g), strict(np.empty(n))), reference)


def test_gram_history_two_loop_direction():
    rng = np.random.default_rng(2)
    n, m = 30, 3
    histories = GramHistory(n, m, np, np.float64), GramHistory(n, m, xps, xps.float64)
    for _ in range(m + 3):
        s = rng.standard_normal(n)
        y = s + 0.2 * rng.standard_normal(n)
        g = rng.standard_normal(n)
        slots = [h.free_slot() for h in histories]
        assert slots[0] == slots[1]
        slot = slots[0]
        products = []
        for h, (si, yi, gi) in zip(histories, ((s, y, g), (strict(s), strict(y), strict(g))),
                                   strict=True):
            h.vectors[2 * slot, :] = si
            h.vectors[2 * slot + 1, :] = yi
            products.append(h.local_products(slot, gi))
        np.testing.assert_allclose(products[1], products[0], rtol=RTOL)
        accepted = [h.absorb(p, slot, 1e-10) for h, p in zip(histories, products, strict=True)]
        assert accepted[0] == accepted[1]
        deltas = [h.direction_coefficients() for h in histories]
        np.testing.assert_allclose(deltas[1], deltas[0], rtol=RTOL)
        reference = histories[0].combine(deltas[0], g, np.empty(n))
        close(histories[1].combine(deltas[1], strict(g), strict(np.empty(n))), reference)
    assert len(histories[1]) == m


@pytest.mark.parametrize("storage", ["float64", "float32"])
def test_factor_inverse_update_and_precondition(storage):
    """Sherman-Morrison steps (the stabiliser firing on some) and the preconditioner."""
    rng = np.random.default_rng(3)
    d_out, d_in = 5, 7
    rtol = RTOL if storage == "float64" else 1e-6
    numpy_factors = [FactorInverse(d, np, np.float64, storage) for d in (d_out, d_in)]
    strict_factors = [FactorInverse(d, xps, xps.float64, storage) for d in (d_out, d_in)]
    fired = []
    for _ in range(6):
        for ref, sf in zip(numpy_factors, strict_factors, strict=True):
            v = 3.0 * rng.standard_normal(ref.d)
            fired.append(ref.update(v, 0.6, 2.0, 0.9))
            assert sf.update(strict(v), 0.6, 2.0, 0.9) == fired[-1]
            close(backend.astype(sf.matrix(), xps.float64), ref.matrix(), rtol)
    assert any(fired) and not all(fired)
    grad = rng.standard_normal((d_out, d_in))
    compute = strict_factors[0].compute_dtype
    reference = precondition(numpy_factors[0].matrix(), grad.astype(numpy_factors[0]
                                                                    .compute_dtype),
                             numpy_factors[1].matrix())
    result = precondition(strict_factors[0].matrix(), backend.astype(strict(grad), compute),
                          strict_factors[1].matrix())
    close(backend.astype(result, xps.float64), reference, rtol)


def test_stabilise_and_sherman_morrison_functions():
    rng = np.random.default_rng(4)
    x = 3.0 * spd(rng, 6)
    v = rng.standard_normal(6)
    sx = strict(x)
    assert stabilise(sx, 2.0, 0.9) == stabilise(x, 2.0, 0.9)
    close(sx, x)
    assert sherman_morrison(sx, strict(v), 0.9) == sherman_morrison(x, v, 0.9)
    close(sx, x)


def assert_same_preconditioning(runs, shapes, rng) -> None:
    """``runs[1]`` (strict namespace) preconditions random gradients as ``runs[0]``
    (NumPy) does."""
    grads = [rng.standard_normal(shape) for shape in shapes]
    references = runs[0].precondition(grads)
    for result, reference in zip(runs[1].precondition([strict(g) for g in grads]), references,
                                 strict=True):
        close(result, reference)


def test_kfac_damped_inverse_and_eigh():
    rng = np.random.default_rng(5)
    f = spd(rng, 8)
    close(damped_inverse(strict(f), 1e-3), damped_inverse(f, 1e-3))
    q_ref, d_ref = damped_eigh(f)
    q, d = damped_eigh(strict(f))
    close(d, d_ref)
    # eigenvectors up to sign: compare the reconstruction
    close(q @ (d[:, None] * q.T), (q_ref * d_ref) @ q_ref.T)


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_kfac_precondition(method):
    rng = np.random.default_rng(6)
    shapes = [(4, 6), (3, 5)]
    comm = hpcqn.serial_comm()
    runs = [KFAC(shapes, comm, method=method, dtype=np.float64, factor_decay=0.5),
            KFAC(shapes, comm, method=method, dtype=np.float64, factor_decay=0.5, xp=xps)]
    for _ in range(2):
        stats = [(spd(rng, i), spd(rng, o)) for o, i in shapes]
        runs[0].update_factors(stats)
        runs[1].update_factors([(strict(a), strict(g)) for a, g in stats])
    for run in runs:
        run.update_inverses()
    assert_same_preconditioning(runs, shapes, rng)


def test_mkor_update_and_precondition():
    rng = np.random.default_rng(7)
    shapes = [(4, 6), (3, 5)]
    comm = hpcqn.serial_comm()
    runs = [MKOR(shapes, comm, dtype=np.float64, factor_decay=0.7),
            MKOR(shapes, comm, dtype=np.float64, factor_decay=0.7, xp=xps)]
    for _ in range(3):
        stats = [(2.0 * rng.standard_normal(i), 2.0 * rng.standard_normal(o)) for o, i in shapes]
        runs[0].update_factors(stats)
        runs[1].update_factors([(strict(a), strict(g)) for a, g in stats])
    assert_same_preconditioning(runs, shapes, rng)


def test_loaded_mlbfgs_state_moves_to_the_parameters_namespace():
    """A checkpoint gives NumPy arrays back; the first step after ``load_state_dict``
    moves every block's momentum and history into the parameters' namespace (CuPy on a
    GPU; the strict namespace here) with the same numbers."""
    from hpcqn.layout import BlockLayout

    rng = np.random.default_rng(5)
    a, b = np.diag(np.linspace(1.0, 10.0, 30)), rng.standard_normal(30)

    def make():
        return hpcqn.MLBFGS(BlockLayout.from_sizes([10, 12, 8], 1), hpcqn.serial_comm(),
                            lr=0.2, period=2)

    opt, x = make(), np.zeros(30)
    for _ in range(6):
        opt.step(x, a @ x - b)
    saved = opt.state_dict()
    fresh = make()
    fresh.load_state_dict(saved)
    fresh._adopt_namespace(xps)
    assert not fresh._loaded
    moved = fresh.state_dict()["blocks"]
    for block, arrays in saved["blocks"].items():
        assert moved[block].keys() == arrays.keys()
        for key, value in arrays.items():
            host = ("history_sy", "history_yy", "history_order")  # small, kept on the host
            if hasattr(value, "nbytes") and key not in host:
                assert backend.namespace(moved[block][key]) is xps, key
            np.testing.assert_array_equal(np.asarray(moved[block][key]), value)
    same = make()
    same.load_state_dict(saved)
    same._adopt_namespace(np)  # already NumPy: nothing to move
    for arrays in same.state_dict()["blocks"].values():
        assert all(backend.namespace(v) is np for v in arrays.values() if hasattr(v, "nbytes"))
