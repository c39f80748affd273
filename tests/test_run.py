"""The shared driver (hpcqn.run): checkpoint policy, the configuration check on resume,
callback stops and the position in the data, through the drivers that use it."""

from __future__ import annotations

import re

import numpy as np
import pytest
from stops import StopAt

import hpcqn
from hpcqn.checkpoint import CheckpointError
from hpcqn.experiments.problems import make_problem
from hpcqn.run import CheckpointPolicy, differences, flatten, skip_done
from hpcqn.signals import Preempted


def test_flatten_and_differences_name_each_key():
    saved = flatten({"method": "sgd", "options": {"lr": 0.1, "betas": [0.9, 0.99]}})
    assert saved == {"method": "'sgd'", "options.lr": "0.1", "options.betas": "(0.9, 0.99)"}
    now = flatten({"method": "sgd", "options": {"lr": 0.2, "momentum": 0.9,
                                                "betas": (0.9, 0.99)}})
    assert differences(saved, now) == ["options.lr: 0.1 -> 0.2",
                                       "options.momentum: (not set) -> 0.9"]


def test_a_refused_resume_names_the_keys_and_the_way_out(tmp_path):
    problem = make_problem("extended_rosenbrock", n=40)
    fun, x0 = problem.distributed()
    with pytest.raises(Preempted):
        hpcqn.minimize(fun, x0, options={"history": 5}, checkpoint_dir=tmp_path,
                       checkpoint_every=2, stop=StopAt(3))
    with pytest.raises(CheckpointError) as info:
        hpcqn.minimize(fun, x0, options={"history": 6, "gtol": 1e-7},
                       checkpoint_dir=tmp_path)
    message = str(info.value)
    assert "options.history: 5 -> 6" in message and "options.gtol: 1e-05 -> 1e-07" in message
    assert "--fresh" in message
    # resume=False starts afresh over the same directory and equals an unbroken run.
    fresh = hpcqn.minimize(fun, x0, options={"history": 6}, checkpoint_dir=tmp_path,
                           resume=False)
    straight = hpcqn.minimize(fun, x0, options={"history": 6})
    np.testing.assert_array_equal(fresh.x, straight.x)


def test_skip_done_drops_the_batches_before_the_checkpoint():
    assert list(skip_done("abcde", 2)) == [(2, "c"), (3, "d"), (4, "e")]
    assert list(skip_done("ab", 5)) == []


@pytest.mark.parametrize("every, keep", [(-1, 2), (1.5, 2), (True, 2), (0, 0)])
def test_a_bad_checkpoint_policy_is_refused_by_name(every, keep):
    with pytest.raises(ValueError, match="every" if keep else "keep"):
        CheckpointPolicy("somewhere", every, keep)


def test_a_stop_from_an_epoch_end_callback_is_agreed_and_ends_the_run():
    problem = hpcqn.experiments.problems.DigitsSoftmax()

    def stop_after_first_epoch(state):
        if state.epoch_end:
            raise StopIteration

    res = hpcqn.minimize_stochastic(
        problem.batch_loss, problem.x0(), problem.batches(60), method="sgd",
        options={"blocks": problem.block_sizes, "disp": False, "epochs": 3, "lr": 0.1},
        callback=stop_after_first_epoch)
    assert res.status == 99 and res.nepochs == 1


def test_sigint_sets_the_stop_flag_and_a_second_one_interrupts():
    """Ctrl-C is a stop like SIGTERM (a flag, no KeyboardInterrupt); the second one on the
    same rank is a hard stop. Real signals to this process."""
    import os
    import signal

    from hpcqn.signals import StopFlag

    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_like_refuses_a_state_of_another_shape_naming_its_key(tmp_path):
    """Driver.resume(like=...): every array and tensor of the state a run would save now
    must be in the checkpoint with the same kind, shape and dtype (what only grows, an
    optimizer's per-parameter entries, is not compared); else a CheckpointError naming
    the key path. Read back through the hardened loader."""
    from hpcqn.run import Driver

    torch = pytest.importorskip("torch")

    serial = hpcqn.serial_comm()
    policy = CheckpointPolicy(tmp_path)
    saved = {"x": np.zeros(4), "model": {"w": torch.zeros(2, 3)}, "optimizer": {"state": {}}}
    Driver(serial, {"a": 1}, policy).save(5, {**saved, "optimizer": {"state": {0: np.ones(2)}}})
    state = Driver(serial, {"a": 1}, policy).resume(like=lambda: saved)
    assert state["optimizer"]["state"][0].shape == (2,)
    cases = [({"x": np.zeros(5)}, "/x is an array of shape (4,) and dtype float64, this run "
                                  "has an array of shape (5,)"),
             ({"x": np.zeros(4, dtype=np.float32)}, "dtype float32"),
             ({"model": {"w": torch.zeros(3, 2)}}, "/model/w is a tensor of shape (2, 3)"),
             ({"model": {"w": np.zeros((2, 3))}}, "/model/w is a tensor"),
             ({"model": {"v": torch.zeros(1)}}, "/model/v is missing"),
             ({"x": {"y": np.zeros(1)}}, "/x is a ndarray, this run has a dict")]
    for like, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            Driver(serial, {"a": 1}, policy).resume(like=lambda like=like: like)
