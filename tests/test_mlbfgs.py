"""mL-BFGS core: damping, the compact history product, momentum and pair formation,
against closed forms and dense float64 references (serial)."""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_direct_bfgs, dense_inverse_bfgs

import hpcqn
from hpcqn.curvature.block_history import BlockHistory
from hpcqn.curvature.damping import SIGMA_H, SIGMA_L, damping_tau
from hpcqn.layout import BlockLayout
from hpcqn.optimizers.mlbfgs import MLBFGS

PLAIN = {"normalize_direction": False, "direction_momentum": 0.0}  # the paper's update


def damped(s, y, damping=0.01):
    tau = damping_tau(float(s @ y / (s @ s)), damping)
    return tau * y + (1 - tau) * s


# -- damping -----------------------------------------------------------------------------
def adversarial_pairs(rng, n=8):
    s = rng.standard_normal(n)
    yield s, -s  # s.y < 0
    yield s, -1e6 * s
    yield s, 1e-12 * s  # nearly flat
    yield s, 1e8 * s  # very stiff
    yield s, rng.standard_normal(n)  # unrelated
    yield s, np.zeros(n)
    yield 1e-150 * s, rng.standard_normal(n)  # tiny s


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.2])
def test_damping_keeps_curvature_in_bounds(damping):
    rng = np.random.default_rng(0)
    pairs = list(adversarial_pairs(rng))
    pairs += [(rng.standard_normal(8), rng.standard_normal(8) * rng.uniform(-5, 5))
              for _ in range(200)]
    for s, y in pairs:
        mu = s @ y / (s @ s)
        y_hat = damped(s, y, damping)
        ratio = (s @ y_hat) / (s @ s)
        assert s @ y_hat > 0
        assert SIGMA_L * (1 - 1e-12) <= ratio <= SIGMA_H * (1 + 1e-12)
        if SIGMA_L < mu < SIGMA_H:  # inside the band only tau0 = 1 - damping acts
            assert ratio == pytest.approx(1 + (1 - damping) * (mu - 1), rel=1e-12)


def test_damping_tau_closed_forms():
    assert damping_tau(-1.0, 0.01) == pytest.approx((1 - SIGMA_L) / 2)  # (1 - sL)/(1 - mu)
    assert damping_tau(3.0, 0.01) == pytest.approx((SIGMA_H - 1) / 2)  # (sH - 1)/(mu - 1)
    assert damping_tau(0.5, 0.01) == 0.99
    assert damping_tau(0.0, 0.5) == 0.5  # capped by tau0
    with pytest.raises(ValueError, match="damping"):
        damping_tau(0.5, 1.0)


# -- the history product -------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-3)])
def test_history_product_is_the_inverse_of_dense_bfgs(dtype, rtol):
    rng = np.random.default_rng(1)
    n, m = 20, 5
    history = BlockHistory(n, m, np, dtype)
    pairs = []
    for _ in range(2 * m + 3):  # wraps the ring buffer
        s = rng.standard_normal(n)
        y = damped(s, rng.standard_normal(n) + 0.5 * s)  # damped: s.y > 0
        s, y = s.astype(dtype), y.astype(dtype)
        history.push(s, y)
        pairs = (pairs + [(s.astype(np.float64), y.astype(np.float64))])[-m:]
        g = rng.standard_normal(n)
        d = history.apply(g.astype(dtype), np.empty(n, dtype=dtype)).astype(np.float64)
        expected = np.linalg.solve(dense_direct_bfgs(pairs, n), g)  # B^-1 g, independently
        np.testing.assert_allclose(d, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
        np.testing.assert_allclose(dense_inverse_bfgs(pairs, n) @ g, expected, rtol=1e-8)
        assert d @ g > 0


def test_history_state_round_trip():
    rng = np.random.default_rng(2)
    history = BlockHistory(6, 3, np, np.float64)
    for _ in range(5):
        s = rng.standard_normal(6)
        history.push(s, damped(s, rng.standard_normal(6)))
    copy = BlockHistory.from_state(history.state_dict(), np)
    g = rng.standard_normal(6)
    np.testing.assert_array_equal(copy.apply(g, np.empty(6)), history.apply(g, np.empty(6)))


# -- momentum and pairs, by hand -------------------------------------------------------------
def test_momentum_and_pairs_by_hand():
    """Three blocks of 2, period 2, beta 0.5, lr 0.1: the sequence written out."""
    layout = BlockLayout.from_sizes([2, 2, 2], 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.1, history=3, period=2, beta=0.5,
                 pair_damping=0.0, **PLAIN)
    a = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    x = np.ones(6)
    thetas, grads = [], []
    for _ in range(3):
        g = a @ x
        thetas.append(x.copy())
        grads.append(g.copy())
        opt.step(x, g)
    # Steps 0 and 1 are first-order: theta_1 = theta_0 - lr g_0, theta_2 = theta_1 - lr g_1.
    np.testing.assert_allclose(thetas[1], thetas[0] - 0.1 * grads[0])
    np.testing.assert_allclose(thetas[2], thetas[1] - 0.1 * grads[1])
    # Momentum starts at step 0's values; at step 2 the pair is formed from steps 0..2.
    m_theta = 0.5 * (0.5 * thetas[0] + 0.5 * thetas[1]) + 0.5 * thetas[2]
    m_grad = 0.5 * (0.5 * grads[0] + 0.5 * grads[1]) + 0.5 * grads[2]
    for block in range(3):
        part = slice(2 * block, 2 * block + 2)
        state = opt.block_state[block]
        np.testing.assert_allclose(state["theta_mom"], m_theta[part])
        s, y = m_theta[part] - thetas[0][part], m_grad[part] - grads[0][part]
        y_hat = damped(s, y, 0.0)
        history = state["history"]
        assert len(history) == 1 and state["npairs"] == 1
        np.testing.assert_allclose(history.vectors[0], s)
        np.testing.assert_allclose(history.vectors[3], y_hat)
        # Step 2's direction: H g_2 with the one pair.
        d = dense_inverse_bfgs([(s, y_hat)], 2) @ grads[2][part]
        np.testing.assert_allclose(x[part], thetas[2][part] - 0.1 * d)


def test_weight_decay_and_lr_schedule():
    layout = BlockLayout.chunks(4, 2, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=lambda t: 0.1 / (t + 1), weight_decay=0.5,
                 period=100, **PLAIN)
    x, g = np.ones(4), np.zeros(4)
    opt.step(x, g)  # d = g + wd x = 0.5; lr(0) = 0.1
    np.testing.assert_allclose(x, 1 - 0.1 * 0.5)
    before = x.copy()
    opt.step(x, np.zeros(4))  # lr(1) = 0.05
    np.testing.assert_allclose(x, before - 0.05 * 0.5 * before)


def test_converges_on_a_deterministic_quadratic():
    """beta 0, period 1: plain block-diagonal L-BFGS with a fixed step; on a block-
    diagonal SPD quadratic it converges to the closed-form minimiser."""
    rng = np.random.default_rng(3)
    blocks = [5, 7, 4]
    matrices = []
    for size in blocks:
        q = rng.standard_normal((size, size))
        matrices.append(q @ q.T / size + 0.5 * np.eye(size))
    a = np.zeros((16, 16))
    start = 0
    for size, m in zip(blocks, matrices, strict=True):
        a[start : start + size, start : start + size] = m
        start += size
    b = rng.standard_normal(16)
    opt = MLBFGS(BlockLayout.from_sizes(blocks, 1), hpcqn.serial_comm(), lr=1.0, beta=0.0,
                 period=1, pair_damping=0.0, sigma_l=1e-8, sigma_h=1e8, **PLAIN)
    x = np.zeros(16)
    for _ in range(60):
        opt.step(x, a @ x - b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8)


def test_nan_gradient_skips_the_step():
    layout = BlockLayout.chunks(6, 3, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.1, period=1, beta=0.0)
    x = np.ones(6)
    opt.step(x, x.copy())
    state_before = opt.state_dict()
    x_before = x.copy()
    g = x.copy()
    g[4] = np.nan
    assert opt.step(x, g) is False
    np.testing.assert_array_equal(x, x_before)
    assert opt.skipped_steps == 1 and opt.step_count == state_before["step_count"]
    after = opt.state_dict()
    for block, saved in state_before["blocks"].items():
        for key, value in saved.items():
            np.testing.assert_array_equal(after["blocks"][block][key], value)
    assert opt.step(x, x.copy()) is True  # the run continues


def test_bad_input():
    layout = BlockLayout.chunks(6, 3, 1)
    comm = hpcqn.serial_comm()
    with pytest.raises(ValueError, match="history"):
        MLBFGS(layout, comm, history=0)
    with pytest.raises(ValueError, match="beta"):
        MLBFGS(layout, comm, beta=1.0)
    with pytest.raises(ValueError, match="momentum_form"):
        MLBFGS(layout, comm, momentum_form="nesterov")
    with pytest.raises(ValueError, match="2 ranks"):
        MLBFGS(BlockLayout.chunks(6, 3, 2), comm)
    opt = MLBFGS(layout, comm)
    with pytest.raises(ValueError, match="length 6"):
        opt.step(np.ones(5), np.ones(5))
    with pytest.raises(TypeError, match="float32 or float64"):
        opt.step(np.ones(6, dtype=int), np.ones(6, dtype=int))


def test_block_layout_greedy_owners_and_rank_major_order():
    layout = BlockLayout.from_sizes([5, 3, 8, 2, 2], 3)
    assert layout.owners == (1, 2, 0, 2, 1)  # 8 -> r0, 5 -> r1, 3 -> r2, 2 -> r2, 2 -> r1
    assert layout.counts == (8, 7, 5)
    x = np.arange(20.0)
    buffer = layout.to_rank_major(x, np.empty(20))
    np.testing.assert_array_equal(buffer[:8], x[8:16])  # rank 0's block 2 first
    np.testing.assert_array_equal(layout.from_rank_major(buffer, np.empty(20)), x)
    assert BlockLayout.chunks(10, 4, 2).sizes == (4, 4, 2)
    with pytest.raises(ValueError, match="positive"):
        BlockLayout.from_sizes([3, 0], 1)


def test_non_finite_pair_is_skipped_and_counted():
    """A pair whose products overflow is skipped: counted, history and step intact."""
    layout = BlockLayout.chunks(4, 4, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=1e-3, period=2, beta=0.0, pair_damping=0.0,
                 **PLAIN)
    x = np.ones(4)
    for _ in range(3):  # steps 0-2: one pair (at step 2)
        opt.step(x, 2.0 * x)
    state = opt.block_state[0]
    assert state["npairs"] == 1
    stored = state["history"].state_dict()
    opt.step(x, np.full(4, 1e200))  # step 3: a huge (finite) gradient moves x by ~1e197
    opt.step(x, 2.0 * x)  # step 4 forms a pair whose s.s overflows: mu is not finite
    assert state["npairs"] == 1 and state["skipped_pairs"] == 1
    for key, value in state["history"].state_dict().items():
        np.testing.assert_array_equal(value, stored[key])
    assert opt.statistics() == {"npairs": 1, "skipped_pairs": 1, "skipped_steps": 0}


@pytest.mark.parametrize(("min_cos", "pushed"), [(0.0, 2), (0.05, 2), (0.2, 1), (0.6, 0)])
def test_min_cos_skips_nearly_orthogonal_pairs(min_cos, pushed):
    """Two pairs by hand (beta 0: s and y are the last period's changes of theta and g):
    cos(s, y) = 0.1 for the first, 0.5 for the second. ``min_cos`` skips the pairs at or
    below it and counts them; 0 (the default) keeps both."""
    layout = BlockLayout.chunks(2, 2, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=1e-12, period=1, beta=0.0, pair_damping=0.0,
                 min_cos=min_cos, **PLAIN)
    x = np.zeros(2)
    opt.step(x, np.zeros(2))  # step 0: the reference point
    for cos in (0.1, 0.5):  # s = e1 (x moved by hand), y at angle acos(cos) to it
        x += np.array([1.0, 0.0])
        opt.step(x, np.array([cos, np.sqrt(1.0 - cos**2)]) + opt.block_state[0]["grad_mom"])
    state = opt.block_state[0]
    assert state["npairs"] == pushed and state["skipped_pairs"] == 2 - pushed
    with pytest.raises(ValueError, match="min_cos"):
        MLBFGS(layout, hpcqn.serial_comm(), min_cos=1.0)


def test_rank_sorted_layout_is_rank_major():
    layout = BlockLayout.from_sizes([5, 3, 8, 2, 2], 3)
    sorted_layout, old_ids = layout.rank_sorted()
    assert list(sorted_layout.owners) == sorted(sorted_layout.owners)
    assert sorted_layout.rank_major_blocks() == list(range(5))
    assert [layout.sizes[b] for b in old_ids] == list(sorted_layout.sizes)
    assert sorted_layout.flag_positions() == [8, 16, 22]


def test_normalized_direction_with_heavy_ball():
    """The defaults: d / ||d|| (global over blocks), then v = 0.9 v + d, x -= lr v."""
    layout = BlockLayout.chunks(4, 2, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.1, period=100)
    x = np.ones(4)
    g1, g2 = np.array([3.0, 0.0, 4.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0])
    opt.step(x, g1.copy())  # warm-up: d = g
    v = g1 / 5.0
    np.testing.assert_allclose(x, 1 - 0.1 * v)
    expected = x - 0.1 * (0.9 * v + g2)
    opt.step(x, g2.copy())
    np.testing.assert_allclose(x, expected)


def test_direction_normalised_to_the_gradient_norm():
    """normalize_to="gradient": d |g| / |d| (global norms). Before any pair d = g, so the
    steps are SGD's with heavy ball 0.9; with a pair, the step has |g|'s length along
    H g (the norms over both blocks)."""
    layout = BlockLayout.chunks(4, 2, 1)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.1, period=100, normalize_to="gradient")
    x = np.ones(4)
    g1, g2 = np.array([3.0, 0.0, 4.0, 0.0]), np.array([0.0, 1.0, 0.0, 2.0])
    opt.step(x, g1.copy())
    np.testing.assert_allclose(x, 1 - 0.1 * g1)
    expected = x - 0.1 * (0.9 * g1 + g2)
    opt.step(x, g2.copy())
    np.testing.assert_allclose(x, expected)
    # A quadratic with distinct curvature per block: after the first pair the direction
    # differs from g, and its length is still |g|.
    a = np.array([1.0, 4.0, 0.5, 2.0])
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.05, period=2, beta=0.5,
                 direction_momentum=0.0, normalize_to="gradient")
    x = np.ones(4)
    for _ in range(5):
        before, g = x.copy(), a * x
        opt.step(x, g.copy())
        np.testing.assert_allclose(np.linalg.norm(before - x), 0.05 * np.linalg.norm(g),
                                   rtol=1e-12)
    assert opt.statistics()["npairs"] > 0


def reference_mlbfgs(x, grad, steps, blocks, lr, history, period, beta, mu, damping=0.01,
                     normalize_to="unit"):
    """The update written out densely and without the stored-scale shortcut: EMA momentum,
    damped pairs, d = H g from a dense inverse BFGS, global normalisation (to 1, or to
    the norm of g), heavy-ball."""
    x = x.copy()
    mth = mg = prev_th = prev_g = None
    v = np.zeros_like(x)
    pairs = [[] for _ in blocks]
    for t in range(steps):
        g = grad(x)
        if t == 0:
            mth, mg = x.copy(), g.copy()
            prev_th, prev_g = x.copy(), g.copy()
        else:
            mth, mg = beta * mth + (1 - beta) * x, beta * mg + (1 - beta) * g
        d = np.empty_like(x)
        for b, part in enumerate(blocks):
            if t > 0 and t % period == 0:
                s, y = mth[part] - prev_th[part], mg[part] - prev_g[part]
                pairs[b] = (pairs[b] + [(s, damped(s, y, damping))])[-history:]
            d[part] = (dense_inverse_bfgs(pairs[b], len(g[part])) @ g[part]
                       if pairs[b] else g[part])
        if t > 0 and t % period == 0:
            prev_th, prev_g = mth.copy(), mg.copy()
        target = np.linalg.norm(g) if normalize_to == "gradient" else 1.0
        v = mu * v + d * (target / np.linalg.norm(d))
        x -= lr * v
    return x


def torch_kernels():
    return pytest.importorskip("hpcqn.torch.mlbfgs").TORCH_KERNELS


@pytest.mark.parametrize("normalize_to", ["unit", "gradient"])
@pytest.mark.parametrize("kernels", ["numpy", "torch"])
@pytest.mark.parametrize("beta, mu", [(0.5, 0.5), (0.99, 0.9), (1e-7, 1e-7)])
def test_many_steps_equal_the_dense_reference(beta, mu, kernels, normalize_to):
    """80 steps, period 30: with beta = mu = 0.5 the stored scales pass 1e-6 between pairs
    and are multiplied back into the buffers; 1e-7 takes the direct path. ``torch``: the
    torch bridge's kernels (torch's products, the fused one-pass heavy-ball with the
    buffer stored divided by the step's scale), the same reference."""
    a = np.diag(np.linspace(1.0, 20.0, 10))
    grad = lambda x: a @ x  # noqa: E731
    layout = BlockLayout.from_sizes([6, 4], 1)
    blocks = [slice(0, 6), slice(6, 10)]
    x0 = np.linspace(-1.0, 1.0, 10)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=0.02, history=3, period=30, beta=beta,
                 direction_momentum=mu, normalize_to=normalize_to)
    if kernels == "torch":
        opt.kernels = torch_kernels()
        assert opt.kernels.fused_heavy_ball
    x = x0.copy()
    for _ in range(80):
        opt.step(x, grad(x))
    assert opt.statistics()["npairs"] == 4
    expected = reference_mlbfgs(x0, grad, 80, blocks, 0.02, 3, 30, beta, mu,
                                normalize_to=normalize_to)
    np.testing.assert_allclose(x, expected, rtol=1e-10, atol=1e-12)


def test_compact_map_is_the_dense_inverse_minus_gamma():
    """The precomputed map K of the history (built once per push): V' K V + gamma I equals
    the dense inverse BFGS matrix (float64), also after the ring buffer wraps."""
    rng = np.random.default_rng(5)
    n, m = 12, 4
    history = BlockHistory(n, m, np, np.float64)
    pairs = []
    for _ in range(m + 3):
        s = rng.standard_normal(n)
        y = damped(s, rng.standard_normal(n) + s)
        history.push(s, y)
        pairs = (pairs + [(s, y)])[-m:]
        k, gamma = history.linear_map()
        dense = history.vectors.T @ k @ history.vectors + gamma * np.eye(n)
        np.testing.assert_allclose(dense, dense_inverse_bfgs(pairs, n), rtol=1e-9,
                                   atol=1e-9 * np.abs(dense).max())


# -- state dicts are snapshots -----------------------------------------------------------
def deep_copy(state):
    if isinstance(state, dict):
        return {k: deep_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [deep_copy(v) for v in state]
    return state.copy() if isinstance(state, np.ndarray) else state


def assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("cls, options", [(MLBFGS, {"period": 2, "history": 3}),
                                          (hpcqn.SGD, {"momentum": 0.9}), (hpcqn.Adam, {})])
def test_a_kept_state_dict_does_not_change_with_later_steps(cls, options):
    """state_dict() kept, then more steps (pairs pushed, momenta and counters moved): the
    kept one equals its deep copy taken at the time; and a state loaded from it does not
    write back into it."""
    layout = BlockLayout.from_sizes([6, 5, 4], 1)
    opt = cls(layout, hpcqn.serial_comm(), lr=0.05, **options)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(layout.n)
    for _ in range(5):
        opt.step(x, 2 * x + rng.standard_normal(layout.n))
    kept = opt.state_dict()
    frozen = deep_copy(kept)
    for _ in range(6):
        opt.step(x, 2 * x + rng.standard_normal(layout.n))
    assert_same_state(kept, frozen)
    assert opt.state_dict()["step_count"] == frozen["step_count"] + 6
    other = cls(layout, hpcqn.serial_comm(), lr=0.05, **options)
    other.load_state_dict(kept)
    y = x.copy()
    for _ in range(4):
        other.step(y, 2 * y + rng.standard_normal(layout.n))
    assert_same_state(kept, frozen)
