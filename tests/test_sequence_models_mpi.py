"""Gradient accumulation on several ranks (mpiexec -n 1/2/3 and torchrun): each rank's
share of the global batch, split into micro-batches, against one process doing one
backward over the global batch (float64), for a model with a convolution and linear
layers on (B, T, d) tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402

pytestmark = pytest.mark.mpi
torch.set_num_threads(1)


class Tokens(nn.Module):
    """A convolution over a sequence's positions, then two linear layers per token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, (1, 3), padding=(0, 1))
        self.up = nn.Linear(3 * 4, 8)
        self.down = nn.Linear(8, 5)

    def forward(self, x):  # x: (B, T, 4) -> (B, T, 5)
        h = self.conv(x.unsqueeze(1))  # (B, 3, T, 4)
        h = h.permute(0, 2, 1, 3).flatten(2)  # (B, T, 12)
        return self.down(torch.tanh(self.up(h)))


def build(kind, model, comm):
    if kind == "kfac":
        return ht.KFAC(model, comm, lr=0.1, inv_freq=2)
    return ht.MKOR(model, comm, lr=0.1, factor_freq=2, hybrid=kind == "mkor_h",
                   hybrid_window=2, hybrid_threshold=0.1)


def train(kind, comm, parts, batches):
    model = Tokens().double()
    opt = build(kind, model, comm)
    for x, y in batches:
        # this rank's rows of the global batch (uneven over 3 ranks), in ``parts``
        # micro-batches, each loss weighted by its share of the global batch
        mine = np.array_split(np.arange(x.shape[0]), comm.size)[comm.rank]
        opt.zero_grad()
        local_loss = 0.0
        for index in np.array_split(mine, parts):
            loss = ((model(x[index]) - y[index]) ** 2).mean()
            (loss * (comm.size * len(index) / x.shape[0])).backward()
            local_loss += float(loss) * comm.size * len(index) / x.shape[0]
        opt.step(loss=torch.tensor(local_loss))
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    return flat, opt


@pytest.mark.parametrize("kind", ["mkor", "mkor_h", "kfac"])
def test_accumulation_on_every_rank_equals_one_backward_in_one_process(comm, kind):
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(10, 6, 4, generator=gen, dtype=torch.float64),
                torch.randn(10, 6, 5, generator=gen, dtype=torch.float64)) for _ in range(8)]
    reference, ref_opt = train(kind, hpcqn.serial_comm(), 1, batches)
    ours, opt = train(kind, comm, 2, batches)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-10)
    if kind == "mkor_h":
        switched = comm.allgather_object(opt.switch.switched_at)
        assert switched == [ref_opt.switch.switched_at] * comm.size
