"""The vector-free two-loop against a dense float64 BFGS inverse-Hessian recursion."""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_inverse_bfgs

from hpcqn.curvature.gram_history import GramHistory

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
