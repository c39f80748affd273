"""Non-finite values in the torch optimizers under mpiexec -n 1/2/3 (issue 15, items 3
and 4): a NaN or Inf in one gradient entry (or in the statistics) on the LAST rank at step
5 makes every rank skip that step and count it, and the run then equals, to 1e-12, a
reference run that never called step() for that batch (parameters, first-order state,
factors); a NaN in one rank's parameters raises on every rank, naming it."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpcqn.torch as ht  # noqa: E402
from hpcqn.torch.data import NonFiniteParameterError  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)

STEPS, BAD, ROWS = 9, 5, 12  # 12 rows a step split evenly over 1, 2 or 3 ranks
METHODS = ["mlbfgs", "mkor", "mkor_owner", "mkor_h", "kfac"]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 2)).double()


def make_optimizer(method: str, model: torch.nn.Module, comm):
    if method == "mlbfgs":
        return ht.MLBFGS(model.parameters(), comm, lr=0.05, period=2, beta=0.9)
    if method in ("mkor", "mkor_owner"):
        return ht.MKOR(model, comm, lr=0.05, factor_freq=1,
                       placement="owner" if method == "mkor_owner" else "redundant")
    if method == "mkor_h":
        return ht.MKOR(model, comm, lr=0.05, factor_freq=2, hybrid=True, hybrid_window=10,
                       hybrid_threshold=0.01)
    return ht.KFAC(model, comm, lr=0.05, factor_freq=1, inv_freq=2)


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * ROWS, 8, dtype=torch.float64, generator=generator)
    y = torch.randn(STEPS * ROWS, 2, dtype=torch.float64, generator=generator)
    return x, y


def run(method, comm, gradient=None, statistics=None, loss_value=None, leave_out=None):
    """``STEPS`` steps; at step ``BAD`` on the last rank: ``gradient`` written into one
    gradient entry, ``statistics`` into one statistics entry, or ``loss_value`` passed
    as the loss; ``leave_out``: the step whose ``step()`` is not called (the reference)."""
    x, y = data()
    model = make_model()
    opt = make_optimizer(method, model, comm)
    last = comm.rank == comm.size - 1
    if statistics is not None:
        original, done = opt._statistics, []

        def poisoned():  # once: a skipped step leaves opt.steps at BAD
            stats = original()
            if opt.steps == BAD and last and not done:
                stats[1][0][0] = statistics  # layer 1's input statistics
                done.append(True)
            return stats

        opt._statistics = poisoned
    for t in range(STEPS):
        opt.zero_grad()
        rows = slice(t * ROWS, (t + 1) * ROWS)
        xb, yb = x[rows][comm.rank :: comm.size], y[rows][comm.rank :: comm.size]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        if t == leave_out:
            continue
        if t == BAD and last and gradient is not None:
            model[0].weight.grad[1, 2] = gradient
        value = loss.item() if t != BAD or not last or loss_value is None else loss_value
        opt.step(loss=value) if method == "mkor_h" else opt.step()
    return model, opt


def vector(model) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()


def arrays(tree, prefix=""):
    """Every array (or tensor) in a nested state, by path."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(arrays(value, f"{prefix}/{key}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(arrays(value, f"{prefix}/{i}"))
        return out
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().numpy()}
    if isinstance(tree, np.ndarray):
        return {prefix: tree}
    return {}


def curvature_state(method, opt):
    """The first-order optimizer's state and the factors (mL-BFGS: its block states)."""
    if method == "mlbfgs":
        return arrays(opt.state_dict()["hpcqn"]["core"]["blocks"])
    saved = opt.state_dict()
    return {**arrays(saved["inner"]["state"], "inner"),
            **arrays(saved["hpcqn"]["factors"], "factors")}


def assert_same_state(comm, method, ours, reference):
    a, b = curvature_state(method, ours), curvature_state(method, reference)
    assert a.keys() == b.keys()
    assert any(comm.allgather_object(bool(a)))  # a rank may own no mL-BFGS block
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12, err_msg=key)


def assert_replicas_agree(comm, model):
    every = comm.allgather_object(vector(model).tobytes())
    assert all(v == every[0] for v in every)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_gradient_on_the_last_rank_is_skipped_everywhere(comm, method, bad):
    ours, opt = run(method, comm, gradient=bad)
    reference, ref_opt = run(method, comm, leave_out=BAD)
    assert opt.skipped_steps == 1 and ref_opt.skipped_steps == 0
    assert comm.allgather_object(opt.skipped_steps) == [1] * comm.size
    assert np.isfinite(vector(ours)).all()
    assert_replicas_agree(comm, ours)
    np.testing.assert_allclose(vector(ours), vector(reference), rtol=0, atol=1e-12)
    assert_same_state(comm, method, opt, ref_opt)
    if method == "mlbfgs":
        assert opt.core.statistics()["skipped_steps"] == 1
        assert opt.core.step_count == ref_opt.core.step_count == STEPS - 1
    else:
        assert opt.steps == ref_opt.steps == STEPS - 1
        assert opt.core.skipped_steps == 1
        assert opt.state_dict()["hpcqn"]["skipped_steps"] == 1
    if method == "mkor_h":  # the skipped step reduced no loss: the window is the reference's
        assert opt.switch.losses == ref_opt.switch.losses
        assert opt.switch.steps == ref_opt.switch.steps == STEPS - 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["mkor", "mkor_owner", "kfac"])
def test_non_finite_statistics_on_the_last_rank_skip_the_step_everywhere(comm, method):
    """The gradients are finite, one rank's statistics are not: the reduced statistics
    are non-finite on every rank, and the whole step is skipped (not just that layer's
    factor update)."""
    ours, opt = run(method, comm, statistics=math.nan)
    reference, ref_opt = run(method, comm, leave_out=BAD)
    assert comm.allgather_object(opt.skipped_steps) == [1] * comm.size
    assert opt.core.missing == ref_opt.core.missing == {}
    assert_replicas_agree(comm, ours)
    np.testing.assert_allclose(vector(ours), vector(reference), rtol=0, atol=1e-12)
    assert_same_state(comm, method, opt, ref_opt)


@pytest.mark.timeout(60)
def test_a_nan_loss_stays_out_of_the_hybrid_window(comm):
    """MKOR-H with finite gradients and a NaN loss on the last rank: the step is taken,
    the global loss (NaN) is left out of the switch's window."""
    ours, opt = run("mkor_h", comm, loss_value=math.nan)
    plain, plain_opt = run("mkor_h", comm)
    assert opt.skipped_steps == 0 and opt.switch.skipped_losses == 1
    assert all(math.isfinite(v) for v in opt.switch.losses)
    expected = plain_opt.switch.losses[:BAD] + plain_opt.switch.losses[BAD + 1:]
    assert opt.switch.losses == expected
    assert opt.switch.steps == plain_opt.switch.steps == STEPS
    np.testing.assert_array_equal(vector(ours), vector(plain))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_a_nan_parameter_on_one_rank_raises_on_every_rank(comm, method):
    x, y = data()
    model = make_model()
    opt = make_optimizer(method, model, comm)
    last = comm.size - 1
    with pytest.raises(NonFiniteParameterError) as info:
        for t in range(STEPS):
            if t == 3 and comm.rank == last:
                with torch.no_grad():
                    model[2].weight[0, 1] = math.nan
            opt.zero_grad()
            rows = slice(t * ROWS, (t + 1) * ROWS)
            loss = torch.nn.functional.mse_loss(model(x[rows][comm.rank :: comm.size]),
                                                y[rows][comm.rank :: comm.size])
            loss.backward()
            opt.step(loss=loss.item()) if method == "mkor_h" else opt.step()
    message = str(info.value)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, ValueError)
    assert f"rank {last}: parameter 2" in message and "(shape (2, 16))" in message
    if method != "mlbfgs":
        assert "'2.weight'" in message
    assert "rank 0:" not in message or last == 0
    assert opt.skipped_steps == 1  # the step that found it, on every rank
    assert comm.allgather_object(t) == [3] * comm.size
