"""The race section's trace helpers (benchmarks/report_race.py) against hand-built traces:
smoothing, time to a target, the loss at a time, the target rule, the ranking, and how
two ranks' traces combine."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
rr = pytest.importorskip("report_race")


def test_smoothed_is_the_trailing_mean():
    losses = [4.0, 2.0, 3.0, 1.0, 5.0]
    got = rr.smoothed(losses, 2)
    assert math.isnan(got[0])
    assert got[1:] == pytest.approx([3.0, 2.5, 2.0, 3.0])
    assert rr.smoothed(losses, 1) == losses


def test_smoothed_marks_windows_holding_a_non_finite_loss():
    got = rr.smoothed([1.0, math.nan, 3.0, 5.0, 7.0], 2)
    assert [math.isnan(v) for v in got] == [True, True, True, False, False]
    assert got[3:] == pytest.approx([4.0, 6.0])


def test_time_to_target_reads_the_first_smoothed_crossing():
    seconds = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    losses = [3.0, 1.0, 2.0, 0.9, 0.8, 0.1]
    # window 1: the raw loss 1.0 at step 2 already meets 1.0
    assert rr.time_to_target(seconds, losses, 1.0, 1) == (2, 0.2)
    # window 2: means 2.0, 1.5, 1.45, 0.85 (step 5), ...
    assert rr.time_to_target(seconds, losses, 1.0, 2) == (5, 0.5)
    # window 3: means 2.0, 1.3, 1.233.., 0.6 (step 6)
    assert rr.time_to_target(seconds, losses, 1.0, 3) == (6, 0.6)
    assert rr.time_to_target(seconds, losses, 0.01, 1) is None
    assert rr.time_to_target([], [], 1.0, 1) is None


def test_loss_at_time_takes_the_first_step_ending_past_it():
    seconds = [0.5, 1.0, 1.5, 2.0]
    losses = [4.0, 3.0, 2.0, 1.0]
    assert rr.loss_at_time(seconds, losses, 0.9, 1) == 3.0
    assert rr.loss_at_time(seconds, losses, 1.0, 2) == pytest.approx(3.5)
    assert rr.loss_at_time(seconds, losses, 9.0, 2) == pytest.approx(1.5)  # the last
    assert math.isnan(rr.loss_at_time([], [], 1.0, 1))


def test_pick_target_is_the_lower_reference_median():
    sgd = [([1.0, 2.0], [2.0, 1.0]), ([1.0, 2.0], [2.0, 3.0]), ([1.0, 2.0], [2.0, 2.0])]
    adam = [([1.0, 2.0], [2.0, 1.5]), ([1.0, 2.0], [2.0, 1.6]), ([1.0, 2.0], [2.0, 1.7])]
    # at 1.5 s: SGD's seeds 1, 3, 2 -> median 2; Adam's 1.5, 1.6, 1.7 -> median 1.6
    assert rr.pick_target({"sgd": sgd, "adam": adam}, 1.5, 1) == pytest.approx(1.6)
    # a reference whose seeds mostly diverged does not set it
    bad = [([1.0, 2.0], [2.0, math.nan])] * 2 + [([1.0, 2.0], [2.0, 0.1])]
    assert rr.pick_target({"sgd": sgd, "adam": bad}, 1.5, 1) == pytest.approx(2.0)
    assert math.isnan(rr.pick_target({"adam": bad}, 1.5, 1))
    # the cap wins where the references sit above it
    assert rr.pick_target({"sgd": sgd, "adam": adam}, 1.5, 1, cap=1.2) == pytest.approx(1.2)
    assert rr.pick_target({"adam": bad}, 1.5, 1, cap=1.2) == pytest.approx(1.2)


def _run(method, seconds, losses, seed=0, error=None):
    return rr.Run(method, 0.1, seed, seconds, losses, losses[-1], error)


def test_ranking_needs_most_seeds_and_orders_by_median_seconds():
    t = [1.0, 2.0, 3.0, 4.0]
    runs = {
        "fast": [_run("fast", t, [2, 1, 0.5, 0.4]), _run("fast", t, [2, 0.5, 0.4, 0.3]),
                 _run("fast", t, [2, 2, 2, 0.5])],
        "slow": [_run("slow", t, [2, 2, 0.5, 0.4])] * 3,
        "once": [_run("once", t, [0.5, 0.4, 0.3, 0.2]), _run("once", t, [2, 2, 2, 2]),
                 _run("once", t, [2, 2, 2, 2], error="diverged")],
    }
    order = rr.ranking(runs, 0.5, 1)
    assert [m for m, _ in order] == ["fast", "slow"]
    fast = order[0][1]
    assert (fast.reached, fast.seeds) == (3, 3)
    assert sorted(fast.seconds) == [2.0, 3.0, 4.0] and fast.median_seconds == 3.0
    assert fast.median_steps == 3
    assert fast.per_step == pytest.approx([1.0, 1.0, 1.0])
    once = rr.stats_of(runs["once"], 0.5, 1)
    assert (once.reached, once.majority) == (1, False)


def test_combine_averages_the_ranks_losses_and_takes_the_slower_clock():
    ranks = [{"seconds": [0.1, 0.2, 0.3], "losses": [2.0, 1.0, 0.5], "final_loss": 0.4,
              "error": None},
             {"seconds": [0.15, 0.18], "losses": [4.0, 2.0], "final_loss": math.nan,
              "error": None}]
    run = rr.combine("sgd", 0.1, 3, ranks)
    assert run.seconds == [0.15, 0.2]
    assert run.losses == pytest.approx([3.0, 1.5])
    assert run.final_loss == 0.4 and not run.diverged and run.steps == 2
    assert run.seconds_per_step == pytest.approx(0.1)


def test_grid_of_takes_the_middle_points():
    assert rr.grid_of("sgd", 7) == rr.GRIDS["sgd"]
    assert rr.grid_of("sgd", 3) == rr.GRIDS["sgd"][2:5] == (0.03, 0.1, 0.3)
    assert all(len(g) == 7 for g in rr.GRIDS.values())
    # Half a decade apart: each rate about sqrt(10) times the one before.
    ratios = [b / a for g in rr.GRIDS.values() for a, b in zip(g[:-1], g[1:], strict=True)]
    assert all(2.9 < r < 3.4 for r in ratios)
    assert set(rr.GRIDS) == set(rr.METHODS) == set(rr.OPTIONS)


def test_beyond_walks_the_one_three_ladder():
    assert rr.beyond(0.01, up=True) == 0.03 and rr.beyond(0.03, up=True) == 0.1
    assert rr.beyond(0.1, up=False) == 0.03 and rr.beyond(0.03, up=False) == 0.01
    assert rr.beyond(3.0, up=True) == 10.0 and rr.beyond(1e-4, up=False) == 3e-5
    # every grid is on the ladder: walking up from its first rate gives the whole grid
    for grid in rr.GRIDS.values():
        walked = [grid[0]]
        while len(walked) < len(grid):
            walked.append(rr.beyond(walked[-1], up=True))
        assert walked == pytest.approx(list(grid), rel=1e-9)


def test_extension_goes_past_the_end_that_holds_the_best():
    assert rr.extension({0.01: 2.0, 0.03: 1.0, 0.1: 1.5}) is None
    assert rr.extension({0.01: 2.0, 0.03: 1.5, 0.1: 1.0}) == 0.3
    assert rr.extension({0.01: 1.0, 0.03: 1.5, 0.1: 2.0}) == 0.003
    # diverged runs are worst; all diverged: the lowest rate is "best", go lower
    assert rr.extension({0.01: math.inf, 0.03: math.inf}) == 0.003
    assert rr.extension({0.01: 1.0, 0.03: 1.0, 0.1: math.inf}) == 0.003  # ties: lower
    assert rr.best_rate({0.3: 0.5, 0.1: 0.5, 1.0: 0.7}) == 0.1


def test_held_out_checks_decide_the_time_to_target():
    seconds = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    checks = [(2, 3.0), (4, 1.9), (6, 1.2)]
    assert rr.check_to_target(seconds, checks, 2.0) == (4, 2.0)
    assert rr.check_to_target(seconds, checks, 1.0) is None
    assert rr.check_to_target(seconds, [(2, math.nan), (4, 1.0)], 2.0) == (4, 2.0)
    # the training losses (all below the target) do not count on a held-out problem
    run = rr.Run("adamw", 0.1, 0, seconds, [0.1] * 6, 1.2, None, checks)
    assert run.to_target(2.0, 1, held_out=True) == (4, 2.0)
    assert run.to_target(2.0, 1) == (1, 0.5)
    assert run.trace(1, held_out=True) == ([1.0, 2.0, 3.0], [3.0, 1.9, 1.2])
    stats = rr.stats_of([run, run], 2.0, 1, held_out=True)
    assert stats.steps == [4, 4] and stats.seconds == [2.0, 2.0]


def test_combine_keeps_rank_zero_checks_and_time_split():
    ranks = [{"seconds": [0.1, 0.2, 0.3], "losses": [2.0, 1.0, 0.5], "final_loss": 0.4,
              "error": None, "checks": [[2, 1.5], [3, 1.4]],
              "info": {"forward_backward": 0.2, "step": 0.1}},
             {"seconds": [0.15, 0.25], "losses": [4.0, 2.0], "final_loss": 0.4,
              "error": None, "checks": [[2, 1.5]], "info": {}}]
    run = rr.combine("mkor", 0.1, 0, ranks)
    assert run.checks == [(2, 1.5)]  # the steps both ranks finished
    assert run.per_step("forward_backward") == pytest.approx(0.1)
    assert math.isnan(run.per_step("factors"))


def test_saved_results_load_back(tmp_path):
    problem = rr.problem_by_key("lm_b256", quick=True)
    runs = {"adamw": [rr.Run("adamw", 0.003, 0, [0.5, 1.0], [4.0, 3.0], 2.9, None,
                             [(2, 3.1)], {"forward_backward": 0.8, "step": 0.2})],
            "mkor_lamb": [rr.Run("mkor_lamb", 0.03, 0, [0.6], [4.0], math.nan,
                                 "RuntimeError: boom", [], {"switched_at": None})]}
    result = rr.ProblemResult(problem, {"adamw": 0.003, "mkor_lamb": 0.03},
                              {"adamw": {0.001: 3.2, 0.003: 2.9}}, runs, 12.5, 3.05,
                              rates={"mkor_lamb": [0.01, 0.03, 0.1]})
    loaded = rr.load_result(rr.save_result(result, tmp_path), problem)
    assert loaded.lrs == result.lrs and loaded.grid == result.grid
    assert loaded.target == 3.05 and loaded.seconds == 12.5 and loaded.rates == result.rates
    assert loaded.runs["adamw"] == runs["adamw"]
    back = loaded.runs["mkor_lamb"][0]
    assert back.error == "RuntimeError: boom" and math.isnan(back.final_loss)
    assert loaded.ranking() == result.ranking()


def test_every_problem_names_known_methods_and_references():
    for quick in (True, False):
        keys = {p.key for p in rr.problems(quick)}
        for p in rr.problems(quick):
            assert set(p.methods) <= set(rr.METHODS)
            assert set(p.references) <= set(p.methods)
            assert p.lr_from is None or p.lr_from in keys
            assert p.held_out == (p.check_every > 0)
            assert p.task.data()["train_x"].shape[0] // p.batch >= 1


def test_a_partial_race_names_the_problems_it_left_out():
    problem = rr.problem_by_key("lm_b256", quick=True)
    result = rr.ProblemResult(problem, {}, {}, {}, 1.0, 3.0)
    lines = rr._left_out(rr.RaceResults([result], (), [0], True, None))
    others = [p for p in rr.problems(True) if p.key != "lm_b256"]
    assert len(lines) == 2 and all(f"(`{p.key}`)" in lines[1] for p in others)
    assert "`lm_b256`" not in lines[1]
    every = [rr.ProblemResult(p, {}, {}, {}, 1.0, 3.0) for p in rr.problems(True)]
    assert rr._left_out(rr.RaceResults(every, (), [0], True, None)) == []
