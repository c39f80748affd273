"""Rank-inconsistent configuration of the torch optimizers under mpiexec -n 1/2/3 (issue
15): an option or a model shape that differs on one rank raises ValueError on every rank
at construction, naming it and the ranks (never silently diverging replicas, nor a hang in
broadcast_parameters); the same configuration everywhere costs one small reduction, the
one the model checksum always made."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)

METHODS = ["mlbfgs", "mkor", "kfac"]


def make_model(hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 2)).double()


def build(method, model, comm, **options):
    if method == "mlbfgs":
        return ht.MLBFGS(model.parameters(), comm, **options)
    return {"mkor": ht.MKOR, "kfac": ht.KFAC}[method](model, comm, **options)


def expected_ranks(comm, first, last_value) -> str:
    last = comm.size - 1
    return (f"ranks 0-{last - 1}" if last > 1 else "rank 0") + f": {first}; " \
        f"rank {last}: {last_value}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_a_different_lr_on_the_last_rank_raises_on_every_rank(comm, method):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    lr = 0.2 if comm.rank == comm.size - 1 else 0.1
    with pytest.raises(ValueError, match="differs between ranks") as info:
        build(method, make_model(), comm, lr=lr)
    message = str(info.value)
    assert f"hpcqn.torch.{method.upper()}: option 'lr'" in message
    assert expected_ranks(comm, "0.1", "0.2") in message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method, name, values", [
    ("mlbfgs", "history", (10, 5)), ("mkor", "factor_freq", (10, 3)),
    ("kfac", "damping", (1e-3, 1e-2)), ("mkor", "placement", ("redundant", "owner")),
])
def test_a_core_option_that_differs_is_named(comm, method, name, values):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    value = values[1] if comm.rank == comm.size - 1 else values[0]
    with pytest.raises(ValueError, match=f"option '{name}' differs between ranks") as info:
        build(method, make_model(), comm, **{name: value})
    assert expected_ranks(comm, repr(values[0]), repr(values[1])) in str(info.value)


@pytest.mark.timeout(60)
def test_a_deprecated_name_for_the_same_value_agrees(comm):
    """``inv_freq`` is MKOR's old name of ``factor_freq``: the same option, no error."""
    name = "inv_freq" if comm.rank == comm.size - 1 else "factor_freq"
    with pytest.warns(DeprecationWarning) if name == "inv_freq" else _no_warning():
        ht.MKOR(make_model(), comm, **{name: 4})


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_a_different_hidden_size_on_one_rank_raises_on_every_rank(comm, method):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    hidden = 17 if comm.rank == comm.size - 1 else 16
    with pytest.raises(ValueError, match="parameter 0 shape differs between ranks") as info:
        build(method, make_model(hidden), comm)
    assert expected_ranks(comm, "(16, 8)", "(17, 8)") in str(info.value)


@pytest.mark.timeout(60)
def test_broadcast_parameters_of_models_of_different_sizes_raises_instead_of_hanging(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    hidden = 17 if comm.rank == comm.size - 1 else 16
    with pytest.raises(ValueError, match="tensor 0 shape differs between ranks") as info:
        ht.broadcast_parameters(make_model(hidden), comm)
    message = str(info.value)
    assert "hpcqn.torch.broadcast_parameters" in message
    assert expected_ranks(comm, "(16, 8)", "(17, 8)") in message
    # A different number of tensors: named too.
    extra = torch.nn.Linear(2, 2) if comm.rank == 0 else torch.nn.Identity()
    model = torch.nn.Sequential(make_model(), extra).double()
    with pytest.raises(ValueError, match="tensor count differs between ranks"):
        ht.broadcast_parameters(model, comm)
    ht.broadcast_parameters(make_model(), comm)  # the same everywhere: fine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_the_same_configuration_costs_one_small_reduction(comm, method):
    """Construction makes exactly one allreduce call (as before this check existed: the
    model checksum), of five float64 numbers: the error flag, a fingerprint of the
    options, one of the model (count, shapes, dtypes), the parameters' sum and sum of
    squares. Nothing else is communicated."""
    c = hpcqn.Communicator(transport=comm.transport)
    model = make_model()
    build(method, model, c, lr=0.05)
    assert c.calls("allreduce") == 1
    assert c.counters["allreduce"].nbytes == 5 * 8
    assert set(c.counters) == {"allreduce"}


@pytest.mark.timeout(60)
def test_a_different_first_order_option_is_named(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    momentum = 0.5 if comm.rank == comm.size - 1 else 0.9
    with pytest.raises(ValueError, match="optimizer_options differs between ranks"):
        ht.KFAC(make_model(), comm, optimizer_options={"momentum": momentum})


@pytest.mark.timeout(60)
def test_average_gradients_of_different_models_raises_on_every_rank(comm):
    """Before: MPICH's "Message truncated" abort with its error stack. Now a ValueError on
    every rank naming the first parameter that differs."""
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    model = make_model(hidden=12 if comm.rank == comm.size - 1 else 16)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="average_gradients: parameter 0 shape differs") as info:
        ht.average_gradients(model.parameters(), comm)
    assert expected_ranks(comm, "(16, 8)", "(12, 8)") in str(info.value)
    same = make_model()  # then a list that agrees averages as before
    for p in same.parameters():
        p.grad = torch.full_like(p, float(comm.rank))
    assert ht.average_gradients(same.parameters(), comm)
    assert float(next(same.parameters()).grad[0, 0]) == (comm.size - 1) / 2
