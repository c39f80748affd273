"""The generic conventions torch's own test suite (test/test_optim.py) checks for every
``torch.optim`` optimizer, for hpcqn's three torch optimizers (issue 16), each compared
with ``torch.optim.SGD``'s behaviour or a closed form; where a convention cannot hold for
a second-order method, the clear error that names the alternative."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402

SERIAL = hpcqn.serial_comm()
KINDS = ("mlbfgs", "mkor", "mkor_h", "kfac")
LAYERWISE = ("mkor", "mkor_h", "kfac")


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(dtype)


def build(kind, model, **extra):
    if kind == "mlbfgs":
        return ht.MLBFGS(model.parameters(), SERIAL, **{"lr": 0.1, "period": 2, **extra})
    if kind == "kfac":
        return ht.KFAC(model, SERIAL, **{"lr": 0.05, "factor_freq": 1, "inv_freq": 2,
                                         "damping": 0.1, **extra})
    options = {"lr": 0.05, "factor_freq": 2, **extra}
    if kind == "mkor_h":
        options.update(hybrid=True, hybrid_window=2, hybrid_threshold=0.5)
    return ht.MKOR(model, SERIAL, **options)


def batch(step, dtype=torch.float64):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=generator)
    return x, y


def loss_of(model, step):
    x, y = batch(step, next(model.parameters()).dtype)
    return torch.nn.functional.cross_entropy(model(x), y)


def train(kind, model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, t)
        loss.backward()
        if kind == "mkor_h":
            opt.step(loss=loss.detach())
        else:
            opt.step()


def vector(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


# 1 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_survives_torch_save_and_weights_only_load_bitwise(kind):
    """5 steps, torch.save/torch.load (default weights_only=True) of the state dict, 5 more
    steps on a fresh model and optimizer: bitwise the unbroken 10-step run."""
    straight = make_model()
    train(kind, straight, build(kind, straight), 10)

    model = make_model()
    opt = build(kind, model)
    train(kind, model, opt, 5)
    saved = opt.state_dict()
    assert not any(isinstance(v, (np.ndarray, np.generic)) for v in leaves(saved))
    assert all(isinstance(v, (torch.Tensor, int, float, str, bool, type(None)))
               for v in leaves(saved))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": saved}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True: the default

    resumed = make_model(seed=1)
    resumed.load_state_dict(loaded["model"])
    fresh = build(kind, resumed)
    fresh.load_state_dict(loaded["optimizer"])
    train(kind, resumed, fresh, 5, start=5)
    assert torch.equal(vector(straight), vector(resumed))


# 2 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_gives_a_working_optimizer_and_pickle_names_the_alternative(kind):
    model = make_model()
    opt = build(kind, model)
    train(kind, model, opt, 3)
    model_copy, opt_copy = copy.deepcopy([model, opt])
    train(kind, model, opt, 3, start=3)
    train(kind, model_copy, opt_copy, 3, start=3)
    assert torch.equal(vector(model), vector(model_copy))  # hooks point at the copy
    alone = copy.deepcopy(opt)  # the optimizer alone (its own parameter copies): steps
    before = [p.detach().clone() for g in alone.param_groups for p in g["params"]]
    for p in (p for g in alone.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    alone.step(**({"loss": 1.0} if kind == "mkor_h" else {}))
    after = [p for g in alone.param_groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(opt)


# 3 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_step_with_a_closure_returns_its_loss_and_steps_as_without(kind):
    """torch's contract, as SGD: the closure runs under enable_grad (step is no_grad), what
    it returns (the loss tensor, or a float) is returned; the steps equal those of the loop
    without closure (MKOR-H takes the closure's loss for its switch)."""
    reference = make_model()
    train(kind, reference, build(kind, reference), 4)
    for maker in (lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                  lambda m: build(kind, m)):
        model = make_model()
        opt = maker(model)
        for t in range(4):
            def closure(t=t, model=model, opt=opt):
                assert torch.is_grad_enabled()
                opt.zero_grad()
                loss = loss_of(model, t)
                loss.backward()
                closure.loss = loss
                return loss

            assert opt.step(closure) is closure.loss
    assert torch.equal(vector(model), vector(reference))
    opt = build(kind, make_model())
    assert opt.step(lambda: 0.5) == 0.5  # whatever the closure returns, as torch.optim
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(0.5)


# 4 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_state_is_per_parameter_and_the_state_dict_torch_shaped_with_hooks(kind):
    calls = []
    model = make_model()
    reference_model = make_model()
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    opt = build(kind, model)
    handles = [register_optimizer_step_pre_hook(
                   lambda o, args, kwargs: calls.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(
                   lambda o, args, kwargs: calls.append(("post", type(o).__name__)))]
    try:
        train(kind, model, opt, 3)
        train("sgd", reference_model, reference, 3)
    finally:
        for handle in handles:
            handle.remove()
    name = type(opt).__name__
    # Exactly once per step, as SGD (MKOR/K-FAC's inner optimizer fires none).
    assert calls == [("pre", name), ("post", name)] * 3 + [("pre", "SGD"), ("post", "SGD")] * 3
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(int(opt.state[p]["step"]) == 3 for p in params)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(("sd_post", set(sd))))
    saved = opt.state_dict()
    assert set(saved) == set(reference.state_dict()) == {"state", "param_groups"}
    assert set(saved["state"]) == set(range(len(params)))
    assert seen == ["sd_pre", ("sd_post", {"state", "param_groups"})]
    fresh = build(kind, make_model())
    fresh.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    fresh.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    fresh.load_state_dict(copy.deepcopy(saved))
    assert seen[-2:] == ["load_pre", "load_post"]
    assert all(int(fresh.state[p]["step"]) == 3 for g in fresh.param_groups
               for p in g["params"])


# 5 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_param_groups_and_one_cycle_lr_with_momentum(kind):
    model = make_model()
    opt = build(kind, model)
    extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="MKOR|KFAC|torch.optim"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert "momentum" in opt.defaults and "momentum" in opt.param_groups[0]
    used = []
    for t in range(5):
        group = opt.param_groups[0]
        used.append((group["lr"], group["momentum"]))
        train(kind, model, opt, 1, start=t)
        scheduler.step()
        if kind == "mlbfgs":  # what the step used: the group's values at the step
            assert (opt.core.lr, opt.core.direction_momentum) == used[-1]
        else:
            assert opt.inner.param_groups[0] is opt.param_groups[0]  # the inner's group
    assert len({m for _, m in used}) == 5 and len({lr for lr, _ in used}) == 5  # cycled
    assert torch.isfinite(vector(model)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_several_groups_through_the_first_order_optimizer(kind):
    """Several groups with their own lr and weight_decay: those of a torch optimizer
    given as ``optimizer=``; a group with lr 0 does not move (closed form)."""
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    inner = torch.optim.SGD([{"params": first, "lr": 0.05},
                             {"params": second, "lr": 0.0, "weight_decay": 0.1}],
                            momentum=0.9)
    opt = build(kind, model, optimizer=inner)
    assert opt.param_groups is inner.param_groups and len(opt.param_groups) == 2
    fixed = [p.detach().clone() for p in second]
    moving = [p.detach().clone() for p in first]
    train(kind, model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(fixed, second, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(moving, first, strict=True))


# 6 ---------------------------------------------------------------------------------------
def test_a_parameter_without_gradient_does_not_move_and_zero_grad_sets_none():
    """As torch.optim.SGD: after zero_grad() (set_to_none=True) every .grad is None; a
    parameter frozen mid-training (no .grad at the step) stays exactly where it was
    while the others move; the gradients that do arrive still reach the flat buffer."""
    model = make_model()
    opt = build("mlbfgs", model)
    train("mlbfgs", model, opt, 4)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    frozen = model[0].weight
    frozen.requires_grad_(False)
    value = frozen.detach().clone()
    others = [p.detach().clone() for p in list(model.parameters())[1:]]
    for t in range(4, 8):
        opt.zero_grad()
        loss_of(model, t).backward()
        assert frozen.grad is None
        opt.step()
        assert torch.equal(frozen, value)  # closed form: not moved at all
    assert all(not torch.equal(a, b) for a, b in zip(others, list(model.parameters())[1:],
                                                     strict=True))
    # The same with torch.optim.SGD: the frozen parameter does not move either.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.zero_grad()
    loss_of(model, 9).backward()
    sgd.step()
    assert torch.equal(frozen, value)
    # zero_grad(set_to_none=False) keeps the views attached (zeros, no copy at the step).
    frozen.requires_grad_(True)
    loss_of(model, 10).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    loss_of(model, 11).backward()
    assert float(opt.flat_grad.abs().sum()) > 0


# 7 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_mixed_dtypes_are_refused_naming_the_fix(kind, dtype):
    torch.optim.SGD(make_model(dtype).parameters(), lr=0.1)  # torch takes them
    with pytest.raises(TypeError, match=r"model\.float\(\).*torch\.autocast"):
        build(kind, make_model(dtype))
    mixed = make_model(torch.float32)
    mixed[2].double()
    with pytest.raises(TypeError, match=r"model\.to\(dtype\)"):
        build(kind, mixed)


# 8 ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_of_step_runs_eagerly_with_the_same_result(kind):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = make_model()
        opt = build(kind, model)
        train(kind, model, opt, 2)
        opt.zero_grad()
        loss = loss_of(model, 2)
        loss.backward()
        step = torch.compile(opt.step) if compiled else opt.step
        if kind == "mkor_h":
            step(loss=loss.detach())
        else:
            step()
        results.append(vector(model))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)


# 4, continued -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_the_earlier_state_dict_layout_still_loads_bitwise(kind):
    """State dicts of the earlier layout (top-level "hpcqn", and "inner" for MKOR/K-FAC;
    NumPy arrays; no "momentum" in MLBFGS's group) load and continue bitwise; the new
    state dict still answers those keys."""
    straight = make_model()
    train(kind, straight, build(kind, straight), 8)
    model = make_model()
    opt = build(kind, model)
    train(kind, model, opt, 4)
    saved = copy.deepcopy(opt.state_dict())
    assert isinstance(saved["hpcqn"], dict)
    if kind == "mlbfgs":
        groups = [{k: v for k, v in g.items() if k != "momentum"}
                  for g in saved["param_groups"]]
        legacy = {"state": {}, "param_groups": groups, "hpcqn": saved["hpcqn"]}
    else:
        legacy = {"inner": saved["inner"], "hpcqn": saved["hpcqn"]}
        assert set(legacy["inner"]) == {"state", "param_groups"}
    assert any(isinstance(v, np.ndarray) for v in leaves(legacy["hpcqn"]))
    resumed = make_model(seed=1)
    resumed.load_state_dict(model.state_dict())
    fresh = build(kind, resumed)
    fresh.load_state_dict(legacy)
    train(kind, resumed, fresh, 4, start=4)
    assert torch.equal(vector(straight), vector(resumed))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_an_adam_inner_keeps_its_own_step_count(kind):
    model = make_model()
    opt = build(kind, model, optimizer="adam", lr=1e-3)
    train(kind, model, opt, 3)
    assert all(float(opt.state[p]["step"]) == 3.0 for p in model.parameters())
    assert "betas" in opt.defaults  # OneCycleLR cycles betas[0] for Adam-style
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=5)
    train(kind, model, opt, 1, start=3)
    scheduler.step()
    assert opt.inner.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


# 6, continued -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_a_frozen_parameter_of_a_preconditioned_layer_does_not_move(kind):
    """As torch.optim.SGD: a bias frozen mid-training (no .grad) stays where it was, while
    its layer's weight (preconditioned with it) moves."""
    model = make_model()
    opt = build(kind, model)
    train(kind, model, opt, 3)
    bias, weight = model[0].bias, model[0].weight
    bias.requires_grad_(False)
    value, start = bias.detach().clone(), weight.detach().clone()
    train(kind, model, opt, 3, start=3)
    assert bias.grad is None and torch.equal(bias, value)
    assert not torch.equal(weight, start)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
def test_mlbfgs_places_each_parameter_that_requires_a_gradient_once():
    """As torch.optim: a parameter given twice is optimized once (the run equals the one
    without the repeat, bitwise); one that does not require a gradient at construction
    is accepted, takes no place in the flat tensors and never moves, and a gradient it
    gets after being unfrozen warns once (it cannot join the fixed layout); a sparse
    gradient raises before any communication."""
    reference = make_model()
    train("mlbfgs", reference, build("mlbfgs", reference), 4)
    model = make_model()
    params = list(model.parameters())
    opt = ht.MLBFGS(params + [params[0]], SERIAL, lr=0.1, period=2)
    train("mlbfgs", model, opt, 4)
    assert torch.equal(vector(model), vector(reference))

    model = make_model()
    frozen = model[2].weight
    frozen.requires_grad_(False)
    value = frozen.detach().clone()
    opt = build("mlbfgs", model)
    assert opt.flat_param.numel() == sum(p.numel() for p in model.parameters()) - value.numel()
    train("mlbfgs", model, opt, 2)
    assert torch.equal(frozen, value)
    frozen.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="did not require a gradient"):
        train("mlbfgs", model, opt, 1, start=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per parameter
        train("mlbfgs", model, opt, 1, start=3)
    assert torch.equal(frozen, value)

    model = make_model()
    opt = build("mlbfgs", model)
    before = vector(model)
    model[0].weight.grad = torch.ones_like(model[0].weight).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(vector(model), before)
