"""Resume is exact: N steps straight equal k steps, a checkpoint, a fresh model and
optimizer loaded from it, and the rest (bitwise), for every torch method, in float64 and
float32; a checkpoint of another configuration is refused."""

from __future__ import annotations

import pytest
from stops import StopAt

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
from hpcqn.checkpoint import CheckpointError  # noqa: E402
from hpcqn.experiments.training import train  # noqa: E402
from hpcqn.signals import Preempted  # noqa: E402

torch.set_num_threads(1)
SERIAL = hpcqn.serial_comm()
OPTIONS = {"mlbfgs": {"lr": 0.1, "period": 5}, "mkor": {"lr": 0.05, "factor_freq": 4},
           "mkor_h": {"lr": 0.05, "factor_freq": 4, "hybrid_window": 5},
           "kfac": {"lr": 0.05, "inv_freq": 4, "damping": 0.1, "placement": "owner"},
           "sgd": {"lr": 0.1, "momentum": 0.9}, "adam": {"lr": 0.01}}


def run(method, tmp_path=None, stop=None, dtype=torch.float64, model="cnn", **extra):
    return train(method, SERIAL, model, OPTIONS[method], epochs=2, batch_size=128,
                 dtype=dtype, lr_schedule="cosine", log=False, checkpoint_dir=tmp_path,
                 stop=stop, **extra)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_resume_is_bitwise(tmp_path, method, dtype):
    straight = run(method, dtype=dtype)
    with pytest.raises(Preempted, match="SIGUSR1 after step 7"):
        run(method, tmp_path, StopAt(7), dtype)  # mid-epoch (10 steps an epoch)
    resumed = run(method, tmp_path, dtype=dtype)
    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters(),
                    strict=True):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in resumed["records"]] == [
        r["train_loss"] for r in straight["records"]]


def test_periodic_checkpoints_and_a_stop_on_an_epoch_boundary(tmp_path):
    straight = run("mlbfgs")
    with pytest.raises(Preempted):
        run("mlbfgs", tmp_path, StopAt(10), checkpoint_every=3)  # the epoch's last step
    assert hpcqn.checkpoint.load(tmp_path, SERIAL).meta == {"method": "mlbfgs", "epoch": 1,
                                                            "batch": 0}
    resumed = run("mlbfgs", tmp_path)
    assert torch.equal(torch.nn.utils.parameters_to_vector(straight["model"].parameters()),
                       torch.nn.utils.parameters_to_vector(resumed["model"].parameters()))


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    with pytest.raises(Preempted):
        run("sgd", tmp_path, StopAt(3))
    with pytest.raises(CheckpointError, match="saved for"):
        train("sgd", SERIAL, "cnn", {"lr": 0.2, "momentum": 0.9}, epochs=2, batch_size=128,
              dtype=torch.float64, lr_schedule="cosine", log=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="saved for"):
        run("sgd", tmp_path, model="mlp")
