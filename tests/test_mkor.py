"""MKOR: the factor-inverse update against dense float64 inverses, the stabiliser, half
storage, preconditioning against the dense product, hook statistics against hand
computations, MKOR-H's switch, state round trips and bad input (one process)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hpcqn
from hpcqn.curvature.kronecker import (
    FactorInverse,
    from_bfloat16_bits,
    precondition,
    sherman_morrison,
    stabilise,
    to_bfloat16_bits,
)
from hpcqn.optimizers.mkor import MKOR as CoreMKOR
from hpcqn.optimizers.mkor import HybridSwitch

NO_STAB = 1e300  # an eps_stab the stabiliser never reaches


# -- the factor update -------------------------------------------------------------------
@pytest.mark.parametrize("gam", [0.5, 0.95])
def test_sherman_morrison_is_the_exact_inverse_over_many_updates(gam):
    rng = np.random.default_rng(0)
    d = 9
    factor = FactorInverse(d, np, np.float64)
    f = np.eye(d)
    for _ in range(60):
        v = rng.standard_normal(d) * rng.uniform(0.1, 3.0)
        assert not factor.update(v, gam, NO_STAB, 0.9)
        f = gam * f + (1 - gam) * np.outer(v, v)
        x = factor.matrix()
        np.testing.assert_allclose(x, np.linalg.inv(f), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(x, x.T)
        assert np.linalg.eigvalsh(x).min() > 0


def test_stabiliser_fires_exactly_above_eps():
    rng = np.random.default_rng(1)
    b = rng.standard_normal((5, 5))
    x = b @ b.T + np.eye(5)
    eps = float(np.abs(x).max())
    same = x.copy()
    assert not stabilise(same, eps, 0.9)  # max|X| == eps: no
    np.testing.assert_array_equal(same, x)
    assert stabilise(same, np.nextafter(eps, 0.0), 0.9)  # just below max|X|: yes
    np.testing.assert_allclose(same, 0.9 * x + 0.1 * np.eye(5), rtol=1e-15)
    # Through FactorInverse: the stabilised X is what the Sherman-Morrison step inverts.
    factor = FactorInverse(5, np, np.float64)
    factor.stored[...] = x
    v = rng.standard_normal(5)
    assert factor.update(v, 0.95, eps / 2, 0.9) and factor.stabilised == 1
    expected = np.linalg.inv(0.95 * np.linalg.inv(0.9 * x + 0.1 * np.eye(5))
                             + 0.05 * np.outer(v, v))
    np.testing.assert_allclose(factor.matrix(), expected, rtol=1e-10)


def test_bfloat16_bits_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0,
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3e38, -1e-40],
                                 dtype=np.float32)])  # ties to even, huge, subnormal
    ours = to_bfloat16_bits(a)
    reference = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(from_bfloat16_bits(ours),
                                  torch.from_numpy(a).to(torch.bfloat16).float().numpy())


# bfloat16 keeps 8 mantissa bits; 20 updates round 20 times.
@pytest.mark.parametrize("storage, rtol", [("float16", 2e-3), ("bfloat16", 4e-2)])
def test_half_storage_tracks_float32(storage, rtol):
    rng = np.random.default_rng(3)
    full, half = FactorInverse(16, np, np.float32), FactorInverse(16, np, np.float32, storage)
    for _ in range(20):
        v = rng.standard_normal(16).astype(np.float32) / 4
        full.update(v, 0.95, NO_STAB, 0.9)  # the stabiliser's threshold is a jump:
        half.update(v, 0.95, NO_STAB, 0.9)  # rounding may decide whether it fires
    assert half.stored.itemsize == 2 and half.matrix().dtype == np.float32
    scale = np.abs(full.matrix()).max()
    np.testing.assert_allclose(half.matrix(), full.matrix(), atol=rtol * scale)


def test_precondition_equals_the_dense_product():
    rng = np.random.default_rng(4)
    linv = np.linalg.inv(np.cov(rng.standard_normal((4, 30))))
    rinv = np.linalg.inv(np.cov(rng.standard_normal((6, 30))))
    grad = rng.standard_normal((4, 6))
    d = linv @ grad @ rinv
    np.testing.assert_allclose(precondition(linv, grad, rinv),
                               d * np.linalg.norm(grad) / np.linalg.norm(d), rtol=1e-12)
    assert not precondition(linv, np.zeros((4, 6)), rinv).any()


def test_sherman_morrison_symmetrises():
    x = np.array([[2.0, 0.5], [0.5, 1.0]])
    sherman_morrison(x, np.array([1.0, -2.0]), 0.9)
    assert x[0, 1] == x[1, 0]


# -- the core optimizer -------------------------------------------------------------------
def test_core_statistics_and_owner_placement_on_one_rank():
    core = CoreMKOR([(3, 5), (2, 4)], hpcqn.serial_comm(), dtype=np.float64)
    stats = [(np.arange(5.0) * 4, 4.0, np.ones(3)), None]
    reduced = core.reduce_statistics(stats)
    np.testing.assert_allclose(reduced[0][0], np.arange(5.0))
    np.testing.assert_allclose(reduced[0][1], np.ones(3))
    assert reduced[1] is None
    core.update_factors(reduced)
    assert core.missing == {1: 1} and core.updates == 1
    owner = CoreMKOR([(3, 5), (2, 4)], hpcqn.serial_comm(), dtype=np.float64,
                     placement="owner")
    owner.update_factors(reduced)
    grads = [np.ones((3, 5)), np.ones((2, 4))]
    for a, b in zip(core.precondition(grads), owner.precondition(grads), strict=True):
        np.testing.assert_array_equal(a, b)


def test_core_bad_input():
    serial = hpcqn.serial_comm()
    with pytest.raises(ValueError, match="factor_decay"):
        CoreMKOR([(2, 2)], serial, factor_decay=1.0)
    with pytest.raises(ValueError, match="placement"):
        CoreMKOR([(2, 2)], serial, placement="everywhere")
    with pytest.raises(ValueError, match="factor_dtype"):
        CoreMKOR([(2, 2)], serial, factor_dtype="int8")
    with pytest.raises(ValueError, match="factor_freq"):
        CoreMKOR([(2, 2)], serial, factor_freq=0)
    with pytest.warns(DeprecationWarning) as record:  # the old names still work
        old = CoreMKOR([(2, 2)], serial, gam=0.8, inv_freq=3)
    assert (old.factor_decay, old.factor_freq) == (0.8, 3)
    assert sorted(str(w.message).split("use ")[1] for w in record) == [
        "'factor_decay' (the same option)", "'factor_freq' (the same option)"]
    with pytest.raises(ValueError, match="factor_decay"):
        CoreMKOR([(2, 2)], serial, gam=0.8, factor_decay=0.8)
    core = CoreMKOR([(2, 3)], serial)
    with pytest.raises(ValueError, match="shape"):
        core.precondition([np.ones((3, 2))])
    with pytest.raises(ValueError, match="expected"):
        core.reduce_statistics([(np.ones(2), 1.0, np.ones(2))])


# -- MKOR-H ------------------------------------------------------------------------------
def test_hybrid_switch_on_a_plateau_and_not_while_falling():
    falling = HybridSwitch(window=10, threshold=0.01)
    assert not any(falling.observe(np.exp(-0.01 * t)) for t in range(500))
    rng = np.random.default_rng(5)
    plateau = HybridSwitch(window=10, threshold=0.01)
    losses = [np.exp(-0.05 * t) for t in range(100)] + list(0.05 + 0.001 * rng.random(200))
    switched = [t for t, loss in enumerate(losses) if plateau.observe(loss)]
    assert len(switched) == 1 and 100 <= switched[0] < 130
    assert plateau.switched_at == switched[0] + 1
    again = HybridSwitch(window=10, threshold=0.01)
    again.load_state_dict(copy.deepcopy(plateau.state_dict()))
    assert again.switched_at == plateau.switched_at
    with pytest.raises(ValueError, match="window"):
        HybridSwitch(window=20).load_state_dict(plateau.state_dict())


def test_float16_statistics_of_many_rows_stay_finite():
    """A float16 sum of 70,000 rows of 100 overflows; the float16 path sends means."""
    core = CoreMKOR([(2, 3)], hpcqn.serial_comm(), stats_dtype="float16")
    rows = 70_000
    a_sum = np.array([100.0 * rows, 0.5 * rows, rows], dtype=np.float32)
    (a, g), = core.reduce_statistics([(a_sum, float(rows), np.ones(2, dtype=np.float32))])
    np.testing.assert_allclose(a, [100.0, 0.5, 1.0], rtol=1e-3)


def test_non_finite_statistics_skip_the_update():
    core = CoreMKOR([(2, 3)], hpcqn.serial_comm(), dtype=np.float64)
    reduced = core.reduce_statistics([(np.array([np.inf, 1.0, 1.0]), 1.0, np.ones(2))])
    assert reduced == [None]
    core.update_factors(reduced)
    np.testing.assert_array_equal(core.factors[0][1].matrix(), np.eye(3))


# -- the warm-up -------------------------------------------------------------------------
@pytest.mark.parametrize("freq, warmup", [(10, 0), (10, 10), (4, 6), (3, 1), (1, 5)])
def test_update_steps_are_every_warmup_step_then_every_factor_freq(freq, warmup):
    core = CoreMKOR([(2, 3)], hpcqn.serial_comm(), factor_freq=freq, warmup_steps=warmup)
    expected = set(range(warmup)) | set(range(0, 60, freq))
    assert {t for t in range(60) if core.is_update_step(t)} == expected
    assert core.warmup_steps == warmup


def test_warmup_steps_must_be_a_count():
    with pytest.raises(ValueError, match="warmup_steps"):
        CoreMKOR([(2, 2)], hpcqn.serial_comm(), warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        CoreMKOR([(2, 2)], hpcqn.serial_comm(), warmup_steps=2.5)
