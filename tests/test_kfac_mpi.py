"""hpcqn.torch.KFAC data-parallel under mpiexec -n 1/2/3: a one-rank run on the whole
batch in this process is the reference; owner placement equals redundant; the factor
traffic per factor step is the factors' entries; a checkpoint saved on P ranks in owner
mode resumes in one process like the unbroken one-rank run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from stops import StopAt

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, make_model, train  # noqa: E402
from hpcqn.signals import Preempted  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)


def run(comm, model_name, batch_size=60, steps=8, **options):
    data = digits(dtype=torch.float64)
    model = make_model(model_name, hidden=24, dtype=torch.float64)
    opt = ht.KFAC(model, comm, lr=0.05, inv_freq=3, damping=0.1, **options)
    batches = ht.GlobalBatches(data["train_y"].numel(), batch_size, comm)
    for _, (rows, weight) in zip(range(steps), batches, strict=False):
        index = torch.as_tensor(rows)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data["train_x"][index]),
                                                 data["train_y"][index]) * weight
        loss.backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy(), opt


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("batch_size", [60, 64])  # 64 splits unevenly over 3 ranks
@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_data_parallel_equals_one_rank_with_the_whole_batch(comm, model_name, batch_size,
                                                            method):
    reference, _ = run(hpcqn.serial_comm(), model_name, batch_size, method=method)
    redundant, _ = run(comm, model_name, batch_size, method=method)
    owner, opt = run(comm, model_name, batch_size, method=method, placement="owner")
    np.testing.assert_allclose(redundant, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(owner, redundant, rtol=1e-10, atol=1e-12)
    kept = comm.allgatherv(np.array([float(k) for k in opt.core.factors]))
    assert sorted(kept.tolist()) == list(range(len(opt.core.shapes)))


def test_factor_traffic_is_the_factors_entries(comm):
    """Per factor step one allreduce of every layer's A and G (plus rows, presence and
    batch size per layer) on top of the gradients'; owner mode adds one allgatherv of the
    preconditioned gradients (every rank receives all of them)."""
    if comm.size == 1:
        pytest.skip("one rank sends nothing")
    c = hpcqn.Communicator(transport=comm.transport)
    data = digits(dtype=torch.float64)
    model = make_model("mlp", hidden=24, dtype=torch.float64)
    opt = ht.KFAC(model, c, lr=0.05, inv_freq=2, factor_freq=2, placement="owner")
    sent = []
    for _ in range(2):
        c.reset_counters()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data["train_x"][:30]),
                                          data["train_y"][:30]).backward()
        opt.step()
        sent.append({k: (v.nbytes, v.nbytes_received) for k, v in c.counters.items()})
    shapes = opt.core.shapes
    factors = sum(o * o + i * i for o, i in shapes) + 3 * len(shapes)
    gradients = sum(p.numel() + 1 for p in model.parameters())
    assert sent[0]["allreduce"][0] - sent[1]["allreduce"][0] == factors * 8
    assert sent[1]["allreduce"][0] == gradients * 8
    assert sent[1]["allgatherv"][1] == sum(o * i for o, i in shapes) * 8


@pytest.mark.timeout(180)
def test_saved_on_p_ranks_resumes_in_one_process(comm, tmp_path_factory):
    """Owner placement stopped after 7 steps on P ranks and checkpointed; every rank then
    resumes a copy alone with the whole batch: equal to the unbroken one-rank run."""

    options = {"lr": 0.05, "inv_freq": 3, "damping": 0.1, "placement": "owner"}
    base = comm.bcast_object(str(tmp_path_factory.mktemp("ck")) if comm.rank == 0 else None)

    def go(c, directory, stop=None):
        return train("kfac", c, "cnn", options, epochs=1, batch_size=120,
                     dtype=torch.float64, log=False, checkpoint_dir=directory, stop=stop)

    with pytest.raises(Preempted):
        go(comm, base, StopAt(7))
    comm.barrier()
    mine = f"{base}-copy-{comm.rank}"
    shutil.copytree(base, mine)
    resumed = go(hpcqn.serial_comm(), mine)["model"]
    reference = go(hpcqn.serial_comm(), None)["model"]
    for p, q in zip(resumed.parameters(), reference.parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-10,
                                   atol=1e-12)
