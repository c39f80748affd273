"""The PyTorch bridge data-parallel under mpiexec -n 1/2/3: a one-rank run on the whole
batch in this process is the reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, make_model  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)


def run(method, comm, model, data, epochs=2, batch_size=60):
    if method == "mlbfgs":
        optimizer = ht.MLBFGS(model.parameters(), comm, lr=0.05, period=4, beta=0.9,
                              normalize_direction=True, direction_momentum=0.9)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = ht.GlobalBatches(data["train_y"].numel(), batch_size, comm)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for rows, weight in batches:
            index = torch.as_tensor(rows)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data["train_x"][index]),
                                                     data["train_y"][index]) * weight
            loss.backward()
            if method != "mlbfgs":
                ht.average_gradients(model.parameters(), comm)
            optimizer.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()


@pytest.mark.parametrize("method", ["mlbfgs", "sgd"])
@pytest.mark.parametrize("batch_size", [60, 64])  # 64 splits unevenly over 3 ranks
def test_data_parallel_equals_one_rank_with_the_whole_batch(comm, method, batch_size):
    data = digits(dtype=torch.float64)
    ours = run(method, comm, make_model("mlp", hidden=32, dtype=torch.float64), data,
               batch_size=batch_size)
    reference = run(method, hpcqn.serial_comm(),
                    make_model("mlp", hidden=32, dtype=torch.float64), data,
                    batch_size=batch_size)
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)


def test_broadcast_parameters_and_the_model_checksum(comm):
    model = make_model("cnn", seed=comm.rank)  # a different model on every rank
    if comm.size > 1:
        expected = ValueError
        with pytest.raises(expected, match="differ between ranks"):
            ht.MLBFGS(model.parameters(), comm)
    ht.broadcast_parameters(model, comm)
    reference = make_model("cnn", seed=0)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    ht.MLBFGS(model.parameters(), comm)  # now the same everywhere


def test_average_gradients(comm):
    model = torch.nn.Linear(3, 2).double()
    for p in model.parameters():
        p.grad = torch.full_like(p, float(comm.rank + 1))
    ht.average_gradients(model.parameters(), comm)
    for p in model.parameters():
        assert torch.all(p.grad == (comm.size + 1) / 2)


@pytest.mark.parametrize("value, finite", [(1e30, True), (float("nan"), False),
                                           (float("-inf"), False), (3.0, True)])
def test_average_gradients_reports_finiteness(comm, value, finite):
    """Finite gradients whose float32 2-norm overflows are finite (the serial path's fused
    norm only screens); a NaN or Inf on one rank is reported on every rank."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30 if value == 1e30 else 1.0)
    if comm.rank == comm.size - 1:
        model[1].weight.grad[0, 1] = value
    assert ht.average_gradients(model.parameters(), comm) is finite
