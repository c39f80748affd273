"""The vector-free two-loop against a dense float64 BFGS inverse-Hessian recursion."""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_direct_bfgs, dense_inverse_bfgs

from hpcqn.curvature.gram_history import GramHistory, SubspaceHistory

EPS = float(np.finfo(np.float64).eps)


def push(history: GramHistory, s: np.ndarray, y: np.ndarray, g: np.ndarray) -> bool:
    slot = history.free_slot()
    s_row, y_row = history.pair_rows(slot)
    s_row[:], y_row[:] = s, y
    return history.absorb(history.local_products(slot, g), slot, EPS)


def random_pair(rng: np.random.Generator, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = rng.standard_normal(a.shape[0])
    return s, a @ s  # y = A s with A SPD: s.y > 0


@pytest.mark.parametrize("history_length", [1, 3, 5])
def test_direction_equals_dense_bfgs(history_length):
    rng = np.random.default_rng(7)
    n = 12
    q = rng.standard_normal((n, n))
    a = q @ q.T + n * np.eye(n)
    history = GramHistory(n, history_length, np, np.float64)
    stored: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(3 * history_length + 2):  # wraps the ring buffer several times
        g = rng.standard_normal(n)
        s, y = random_pair(rng, a)
        assert push(history, s, y, g)
        stored = (stored + [(s, y)])[-history_length:]
        delta = history.direction_coefficients()
        d = history.combine(delta, g, np.empty(n))
        expected = -dense_inverse_bfgs(stored, n) @ g
        np.testing.assert_allclose(d, expected, rtol=1e-10, atol=1e-12)
        assert history.dot_g(delta) == pytest.approx(d @ g, rel=1e-10)
        assert history.norm2(delta) == pytest.approx(d @ d, rel=1e-10)
        assert d @ g < 0  # descent: H is SPD


def test_pair_without_curvature_is_skipped():
    rng = np.random.default_rng(3)
    n = 6
    history = GramHistory(n, 4, np, np.float64)
    s, y = random_pair(rng, np.eye(n) * 2.0)
    g = rng.standard_normal(n)
    assert push(history, s, y, g)
    assert not push(history, s, -y, g)  # s.y < 0
    assert not push(history, s, np.full(n, np.nan), g)  # non-finite
    assert len(history) == 1
    d = history.combine(history.direction_coefficients(), g, np.empty(n))
    np.testing.assert_allclose(d, -dense_inverse_bfgs([(s, y)], n) @ g, rtol=1e-12)


def test_empty_history_gives_steepest_descent_and_reset():
    rng = np.random.default_rng(5)
    n = 5
    history = GramHistory(n, 3, np, np.float64)
    g = rng.standard_normal(n)
    history.set_gradient_norm2(float(g @ g))
    np.testing.assert_array_equal(history.combine(history.direction_coefficients(), g,
                                                  np.empty(n)), -g)
    push(history, *random_pair(rng, np.eye(n)), g)
    history.reset()
    delta = history.direction_coefficients()
    np.testing.assert_array_equal(history.combine(delta, g, np.empty(n)), -g)
    assert history.norm2(delta) == pytest.approx(g @ g)


def test_local_products_of_split_vectors_sum_to_global():
    """What each rank computes on its slice sums to the dot products of whole vectors."""
    rng = np.random.default_rng(11)
    n, cuts = 10, [0, 3, 3, 10]  # the middle rank has an empty slice
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    pieces = [GramHistory(b - a, 2, np, np.float64) for a, b in spans]
    whole = GramHistory(n, 2, np, np.float64)
    for _ in range(4):
        s, y, g = rng.standard_normal((3, n))
        slot = whole.free_slot()
        for part, (a, b) in zip(pieces, spans, strict=True):
            s_row, y_row = part.pair_rows(slot)
            s_row[:], y_row[:] = s[a:b], y[a:b]
        s_row, y_row = whole.pair_rows(slot)
        s_row[:], y_row[:] = s, y
        summed = sum(p.local_products(slot, g[a:b]) for p, (a, b) in zip(pieces, spans,
                                                                         strict=True))
        np.testing.assert_allclose(summed, whole.local_products(slot, g), rtol=1e-13)
        accepted = whole.absorb(summed, slot, EPS)
        for part in pieces:
            assert part.absorb(summed, slot, EPS) == accepted


@pytest.mark.parametrize("history_length,n_binding", [(1, 4), (3, 0), (3, 5), (5, 11)])
def test_subspace_direction_equals_dense_reduced_newton_step(history_length, n_binding):
    """The bounded run's direction is L-BFGS-B's subspace step: on the free variables
    ``d_F = -(B_FF)^-1 g_F`` with ``B`` the dense direct BFGS matrix (a different
    recursion from the compact form the code uses), zero on the binding ones; split over
    two "ranks" (slices whose products are summed) as under MPI."""
    rng = np.random.default_rng(11)
    n = 12
    q = rng.standard_normal((n, n))
    a = q @ q.T + n * np.eye(n)
    halves = (slice(0, 5), slice(5, n))
    parts = [SubspaceHistory(h.stop - h.start, history_length, np, np.float64) for h in halves]
    stored: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(2 * history_length + 2):
        g = rng.standard_normal(n)
        binding = np.zeros(n, dtype=bool)
        binding[rng.choice(n, n_binding, replace=False)] = True
        g_free = np.where(binding, 0.0, g)
        s, y = random_pair(rng, a)
        slot = parts[0].free_slot()
        products = 0.0
        for part, h in zip(parts, halves, strict=True):
            s_row, y_row = part.pair_rows(slot)
            s_row[:], y_row[:] = s[h], y[h]
            part.set_free(~binding[h])
            products = products + part.local_products(slot, g_free[h])
        for part in parts:
            assert part.absorb(products, slot, EPS)
        stored = (stored + [(s, y)])[-history_length:]
        deltas = [part.direction_coefficients() for part in parts]
        np.testing.assert_array_equal(deltas[0], deltas[1])
        d = np.concatenate([part.combine(deltas[0], g_free[h], np.empty(h.stop - h.start))
                            for part, h in zip(parts, halves, strict=True)])
        d[binding] = 0.0
        free = ~binding
        b = dense_direct_bfgs(stored, n)
        expected = np.zeros(n)
        expected[free] = -np.linalg.solve(b[np.ix_(free, free)], g[free])
        np.testing.assert_allclose(d, expected, rtol=1e-9, atol=1e-11)
        assert parts[0].dot_g(deltas[0]) == pytest.approx(d @ g, rel=1e-9)
        assert parts[0].gradient_norm2(products) == pytest.approx(g_free @ g_free, rel=1e-12)
        assert parts[0].fallbacks == 0


def test_blocked_products_equal_one_product():
    """Past two blocks the products run block by block: the same numbers as one GEMM."""
    from hpcqn.curvature.gram_history import PRODUCT_BLOCK, row_products

    rng = np.random.default_rng(2)
    for n in (10, 2 * PRODUCT_BLOCK + 1, 3 * PRODUCT_BLOCK + 17):
        rows, columns = rng.standard_normal((12, n)), rng.standard_normal((5, n))
        np.testing.assert_allclose(row_products(rows, columns), rows @ columns.T,
                                   rtol=1e-12, atol=1e-12 * n)


@pytest.mark.parametrize("n", [40, 3 * 4096 + 5])
def test_free_table_updates_equal_products_over_the_free_set(n):
    """The bounded history's table of products over the free variables, updated from the
    variables that entered or left the free set (and recomputed now and then), equals
    the products of the stored rows restricted to the current free set."""
    rng = np.random.default_rng(8)
    history = SubspaceHistory(n, 3, np, np.float64)
    free = np.ones(n, dtype=bool)
    for step in range(12):
        flips = rng.choice(n, 3 if step % 4 else n // 2, replace=False)  # few, then many
        free[flips] = ~free[flips]
        s = rng.standard_normal(n)
        y = 2.0 * s + 0.1 * rng.standard_normal(n)
        slot = history.free_slot()
        s_row, y_row = history.pair_rows(slot)
        s_row[:], y_row[:] = s, y
        history.set_free(free.copy())
        g = np.where(free, rng.standard_normal(n), 0.0)
        products = history.local_products(slot, g)
        assert history.absorb(products, slot, EPS)
        rows = history._rows_for(slot)
        part = history.vectors[:rows][:, free]
        np.testing.assert_allclose(history.free_products[:rows, :rows], part @ part.T,
                                   rtol=1e-10, atol=1e-10 * n)
