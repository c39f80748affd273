"""hpcqn.torch.MKOR data-parallel under mpiexec -n 1/2/3: a one-rank run on the whole
batch in this process is the reference; owner placement equals redundant; the
curvature traffic per update step is O(sum of layer widths)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, make_model  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)


def run(comm, model_name, batch_size=60, steps=12, **options):
    data = digits(dtype=torch.float64)
    model = make_model(model_name, hidden=24, dtype=torch.float64)
    opt = ht.MKOR(model, comm, lr=0.05, inv_freq=3, **options)
    batches = ht.GlobalBatches(data["train_y"].numel(), batch_size, comm)
    for _, (rows, weight) in zip(range(steps), batches, strict=False):
        index = torch.as_tensor(rows)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data["train_x"][index]),
                                                 data["train_y"][index]) * weight
        loss.backward()
        opt.step(loss=loss.item()) if "hybrid" in options else opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy(), opt


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("batch_size", [60, 64])  # 64 splits unevenly over 3 ranks
def test_data_parallel_equals_one_rank_with_the_whole_batch(comm, model_name, batch_size):
    reference, _ = run(hpcqn.serial_comm(), model_name, batch_size)
    redundant, _ = run(comm, model_name, batch_size)
    owner, opt = run(comm, model_name, batch_size, placement="owner")
    np.testing.assert_allclose(redundant, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(owner, redundant, rtol=1e-10, atol=1e-12)
    # Owner mode keeps only this rank's factors; together the ranks hold every layer once.
    kept = comm.allgatherv(np.array([float(k) for k in opt.core.factors]))
    assert sorted(kept.tolist()) == list(range(len(opt.core.shapes)))


def test_curvature_traffic_per_update_step_is_linear_in_widths(comm):
    if comm.size == 1:
        pytest.skip("one rank sends nothing")
    c = hpcqn.Communicator(transport=comm.transport)
    data = digits(dtype=torch.float64)
    model = make_model("mlp", hidden=24, dtype=torch.float64)
    opt = ht.MKOR(model, c, lr=0.05, inv_freq=2)
    sent = []
    for _ in range(4):
        c.reset_counters()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data["train_x"][:30]),
                                          data["train_y"][:30]).backward()
        opt.step()
        sent.append({k: v.nbytes for k, v in c.counters.items()})
    shapes = opt.core.shapes
    widths = sum(o + i for o, i in shapes) + 3 * len(shapes)  # rows, presence, batch
    # The gradients' allreduce: every entry plus a presence flag per tensor.
    gradients = sum(p.numel() + 1 for p in model.parameters())
    # Update steps (0, 2) add exactly one allreduce of the statistics to the gradients'.
    assert sent[0] == sent[2] and sent[1] == sent[3]
    assert sent[0]["allreduce"] - sent[1]["allreduce"] == widths * 8
    assert sent[1]["allreduce"] == gradients * 8
    assert widths < sum(o * o + i * i for o, i in shapes) / 20


def test_hybrid_switch_is_the_same_step_on_every_rank(comm):
    _, opt = run(comm, "mlp", steps=20, hybrid=True, hybrid_window=3, hybrid_threshold=0.5)
    """Each rank's own loss differs; the switch uses their global mean."""
    assert opt.switch.switched_at is not None
    steps = comm.allgatherv(np.array([float(opt.switch.switched_at)]))
    assert len(set(steps.tolist())) == 1


def test_float16_statistics_halve_the_traffic(comm):
    """stats_dtype='float16': the statistics allreduce carries 2 bytes a number, and the
    run stays close to the float32-statistics one."""
    if comm.size == 1:
        pytest.skip("one rank sends nothing")
    c = hpcqn.Communicator(transport=comm.transport)
    full, _ = run(comm, "mlp", steps=4)
    c.reset_counters()
    half, opt = run(c, "mlp", steps=4, stats_dtype="float16")
    shapes = opt.core.shapes
    widths = sum(o + i for o, i in shapes) + 3 * len(shapes)  # rows, presence, batch
    gradients = sum(o * i + 2 for o, i in shapes)  # weight and bias, a flag for each
    # The model checksum at construction (5 float64 numbers); 4 steps at inv_freq 3:
    # update steps 0 and 3; the gradients in float64 at every step.
    assert c.counters["allreduce"].nbytes == 5 * 8 + 4 * gradients * 8 + 2 * widths * 2
    np.testing.assert_allclose(half, full, rtol=0, atol=1e-2)


def test_a_layer_used_on_some_ranks_only(comm):
    """A branch only rank 1 runs: gradients are still one allreduce of equal length, the
    branch's layer gets rank 1's gradient averaged over all ranks, and its factors are
    updated from the ranks that saw it."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 3)
            self.branch = torch.nn.Linear(4, 3)

        def forward(self, x, use_branch):
            return self.body(x) + (self.branch(x) if use_branch else 0.0)

    net = Net().double()
    opt = ht.MKOR(net, comm, lr=0.1, optimizer_options={"momentum": 0.0})
    x = torch.randn(5, 4, dtype=torch.float64)
    net(x, comm.rank == 1).pow(2).sum().backward()
    expected = net.branch.weight.grad.clone() / comm.size if comm.rank == 1 else None
    opt.step()
    grads = comm.allgatherv(net.branch.weight.grad.reshape(-1).numpy().copy()
                            if net.branch.weight.grad is not None else np.zeros(0))
    if comm.size == 1:
        assert net.branch.weight.grad is None and opt.core.missing == {1: 1}
    else:
        assert grads.size == 12 * comm.size  # every rank has the (preconditioned) gradient
        assert opt.core.missing == {}
        if expected is not None:
            assert torch.isfinite(net.branch.weight).all()


def test_hybrid_switch_follows_the_mean_loss_not_the_local_one(comm):
    """Rank 0 reports a flat loss (alone it would switch at once), the others a falling
    one: the switch follows the mean over ranks, as a switch fed the means decides."""
    from hpcqn.optimizers.mkor import HybridSwitch

    model = make_model("mlp", hidden=8, dtype=torch.float64)
    opt = ht.MKOR(model, comm, lr=0.01, hybrid=True, hybrid_window=3, hybrid_threshold=0.05)
    reference = HybridSwitch(3, 0.05)
    data = digits(dtype=torch.float64)
    expected = None
    for t in range(30):
        losses = [1.0] + [float(np.exp(-0.3 * t * r)) for r in range(1, comm.size)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data["train_x"][:8]),
                                          data["train_y"][:8]).backward()
        opt.step(loss=losses[comm.rank])
        if reference.observe(sum(losses) / comm.size) and expected is None:
            expected = reference.switched_at
    assert opt.switch.switched_at == expected
    if comm.size > 1:
        assert expected != 6  # rank 0 on its own would have switched after step 6
