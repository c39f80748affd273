"""hpcqn.torch.MKOR in one process: hook statistics against hand computations (Linear,
and Conv2d against explicitly extracted patches), the step against the dense
preconditioned gradient, the AMP loss scale, skipped and unused layers, MKOR-H, the
state round trip, and bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, make_model  # noqa: E402
from hpcqn.torch.capture import LayerCapture  # noqa: E402

nn = torch.nn
torch.set_num_threads(1)
SERIAL = hpcqn.serial_comm()


def test_linear_statistics_are_the_batch_means():
    """loss = sum(out^2) / (2B): dL/dout = out / B, so g = mean(out / B) * B = mean(out)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(7, 4, dtype=torch.float64) * 300  # beyond the clamp at 100
    opt = ht.MKOR(layer, SERIAL, lr=0.1)
    out = layer(x)
    (out.pow(2).sum() / (2 * 7)).backward()
    (a_sum, count, g), = opt._statistics()
    ones = torch.ones(7, 1, dtype=torch.float64)
    expected_a = torch.cat([x.clamp(-100, 100), ones], 1).sum(0)
    np.testing.assert_allclose(a_sum, expected_a.numpy(), rtol=1e-14)
    assert count == 7
    np.testing.assert_allclose(g, out.detach().mean(0).numpy(), rtol=1e-12)


def test_conv_statistics_equal_explicit_patches():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                     dilation=(1, 2)).double()
    x = torch.randn(5, 2, 7, 6, dtype=torch.float64)
    opt = ht.MKOR(conv, SERIAL, lr=0.1)
    out = conv(x)
    weights = torch.randn_like(out)
    (out * weights).sum().div(5).backward()  # dL/dout = weights / 5
    (a_sum, count, g), = opt._statistics()
    # Patches by hand: pad, then for every output position take the dilated window.
    padded = nn.functional.pad(x, (0, 0, 1, 1))
    rows = []
    for b in range(5):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                window = padded[b, :, 2 * i : 2 * i + 3, j : j + 3 : 2]  # rows 3, cols 2
                rows.append(torch.cat([window.reshape(-1), torch.ones(1, dtype=x.dtype)]))
    rows = torch.stack(rows)
    assert count == rows.shape[0] == 5 * out.shape[2] * out.shape[3]
    np.testing.assert_allclose(a_sum, rows.sum(0).numpy(), rtol=1e-12)
    positions = out.shape[2] * out.shape[3]
    expected_g = (weights / 5).sum(dim=(0, 2, 3)) / (5 * positions) * 5
    np.testing.assert_allclose(g, expected_g.numpy(), rtol=1e-12)


def dense_direction(opt, layer, grad):
    """Linv [W|b]-gradient Rinv, rescaled to the gradient's norm, from the optimizer's
    factors after the step (float64, NumPy)."""
    linv, rinv = (f.matrix() for f in opt.core.factors[0])
    d = linv @ grad @ rinv
    return d * np.linalg.norm(grad) / np.linalg.norm(d)


def test_step_applies_the_dense_preconditioned_gradient():
    torch.manual_seed(2)
    layer = nn.Linear(5, 3).double()
    opt = ht.MKOR(layer, SERIAL, lr=0.1, optimizer_options={"momentum": 0.0})
    x = torch.randn(9, 5, dtype=torch.float64)
    for _ in range(3):  # update steps 0 (factor_freq 10): factors set at step 0
        before = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), torch.ones(9, 3, dtype=torch.float64)).backward()
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).numpy().copy()
        opt.step()
        after = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
        np.testing.assert_allclose((before - after).numpy() / 0.1,
                                   dense_direction(opt, layer, grad), rtol=1e-10)
    assert opt.core.updates == 1


class Scaler:
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


def test_amp_loss_scale_is_undone():
    """A loss scaled by 1024 (gradients unscaled before the step, as GradScaler does)
    gives the same factors as the unscaled loss."""
    results = []
    for scale in (1.0, 1024.0):
        model = make_model("mlp", hidden=16, dtype=torch.float64)
        opt = ht.MKOR(model, SERIAL, lr=0.1, grad_scaler=Scaler(scale))
        data = digits(dtype=torch.float64)
        loss = nn.functional.cross_entropy(model(data["train_x"][:32]), data["train_y"][:32])
        (loss * scale).backward()
        for p in model.parameters():
            p.grad /= scale
        opt.step()
        results.append([f.matrix() for pair in opt.core.factors.values() for f in pair])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_skipped_and_unused_layers():
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    net = Net().double()
    opt = ht.MKOR(net, SERIAL, lr=0.1, skip_layers=["he.*"])
    assert opt.capture.names == ["body", "unused"] and opt.capture.skipped == ["head"]
    x = torch.randn(6, 4, dtype=torch.float64)
    net(x).sum().backward()
    head_grad = net.head.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="unused"):
        opt.step()
    assert opt.core.missing == {1: 1}
    # The skipped layer took a plain SGD step with its own gradient (momentum buffer = grad).
    torch.testing.assert_close(opt.inner.state[net.head.weight]["momentum_buffer"], head_grad)
    assert net.unused.weight.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not at every update step
        for _ in range(11):
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()


def train_steps(opt, model, data, steps, start=0, hybrid=False):
    for k in range(start, start + steps):
        rows = slice(32 * k % 1300, 32 * k % 1300 + 32)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data["train_x"][rows]), data["train_y"][rows])
        loss.backward()
        opt.step(loss=loss.item()) if hybrid else opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["sgd", "adam", "lamb"])
def test_state_dict_round_trip_continues_bitwise(dtype, kind):
    data = digits(dtype=dtype)
    options = {"optimizer": kind, "lr": 0.01 if kind != "sgd" else 0.05, "factor_freq": 3,
               "hybrid": True, "hybrid_window": 4}
    straight = make_model("cnn", dtype=dtype)
    opt = ht.MKOR(straight, SERIAL, **options)
    train_steps(opt, straight, data, 14, hybrid=True)

    first = make_model("cnn", dtype=dtype)
    opt1 = ht.MKOR(first, SERIAL, **options)
    train_steps(opt1, first, data, 8, hybrid=True)
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict()))
    resumed = make_model("cnn", seed=7, dtype=dtype)
    resumed.load_state_dict(saved[0])
    opt2 = ht.MKOR(resumed, SERIAL, **options)
    opt2.load_state_dict(saved[1])
    train_steps(opt2, resumed, data, 6, start=8, hybrid=True)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.switch.switched_at == opt.switch.switched_at


def test_hybrid_switch_stops_the_factor_work():
    model = make_model("mlp", hidden=16)
    opt = ht.MKOR(model, SERIAL, lr=0.05, factor_freq=2, hybrid=True, hybrid_window=3)
    data = digits()
    for k in range(20):  # a constant reported loss: a plateau from the start
        opt.zero_grad()
        nn.functional.cross_entropy(model(data["train_x"][:16]), data["train_y"][:16]).backward()
        opt.step(loss=1.0)
        if k == 5:
            assert opt.switch.switched_at == 6 and opt.core.updates == 3
    assert opt.core.updates == 3 and not opt.capture.active


def test_bad_input():
    model = make_model("mlp", hidden=8)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ht.MKOR(model, SERIAL, optimizer="rmsprop")
    with pytest.raises(TypeError, match="one dtype"):
        ht.MKOR(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()), SERIAL)
    with pytest.raises(TypeError, match="float32 or float64"):
        ht.MKOR(nn.Linear(2, 2).half(), SERIAL)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ht.MKOR(nn.Sequential(nn.ReLU()), SERIAL)
    with pytest.raises(ValueError, match="placement"):
        ht.MKOR(model, SERIAL, placement="somewhere")
    opt = ht.MKOR(model, SERIAL, hybrid=True)
    with pytest.raises(ValueError, match="loss"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(0.0)
    other = ht.MKOR(make_model("cnn"), SERIAL)
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(ht.MKOR(make_model("mlp", hidden=8), SERIAL).state_dict())
    with pytest.raises(ValueError, match="not an hpcqn.torch.MKOR"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_scheduler_drives_the_inner_optimizer():
    model = make_model("mlp", hidden=8)
    opt = ht.MKOR(model, SERIAL, optimizer="adam", lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = digits()
    nn.functional.cross_entropy(model(data["train_x"][:8]), data["train_y"][:8]).backward()
    opt.step()
    scheduler.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.005)


def test_layer_capture_reports_grouped_convolutions():
    capture = LayerCapture(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2)))
    assert capture.unsupported == ["0"] and capture.names == ["1"]


def test_lamb_first_step_closed_form():
    """Step 1 from zero state: m_hat = g, v_hat = g^2, r = g / (|g| + eps) + wd p, and
    p -= lr ||p|| / ||r|| r."""
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64))
    g = torch.tensor([0.2, 0.1, -2.0], dtype=torch.float64)
    p.grad = g.clone()
    ht.LAMB([p], lr=0.1, eps=1e-6, weight_decay=0.01).step()
    p0 = torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64)
    r = g / (g.abs() + 1e-6) + 0.01 * p0
    expected = p0 - 0.1 * (p0.norm() / r.norm()) * r
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_autocast_rows_and_a_skipped_step():
    """Under bfloat16 autocast the rows are recorded in the parameters' dtype; statistics
    from a step that was skipped (zero_grad without step) are forgotten."""
    model = make_model("mlp", hidden=16)
    opt = ht.MKOR(model, SERIAL, lr=0.05)
    data = digits()
    x, y = data["train_x"][:32], data["train_y"][:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert {t.dtype for rows in opt.capture.inputs.values() for t in rows} == {torch.float32}
    opt.zero_grad()  # as if a GradScaler had skipped the step
    assert not opt.capture.inputs and not opt.capture.grads
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forward_without_backward_leaves_no_rows():
    layer = nn.Linear(3, 2).double()
    opt = ht.MKOR(layer, SERIAL, lr=0.1)
    layer(torch.randn(50, 3, dtype=torch.float64))  # e.g. a validation loss, no backward
    x = torch.randn(4, 3, dtype=torch.float64)
    layer(x).sum().backward()
    (_, count, _), = opt._statistics()
    assert count == 4


@pytest.mark.parametrize("kind", ["mkor", "kfac"])
def test_a_nan_gradient_skips_the_step_and_the_count_survives_a_round_trip(kind):
    """A NaN gradient: nothing moves (parameters, momentum, factors, the step counter),
    ``skipped_steps`` counts it and travels in the state_dict."""
    model = make_model("mlp", hidden=8, dtype=torch.float64)
    make = ht.MKOR if kind == "mkor" else ht.KFAC
    opt = make(model, SERIAL, lr=0.1, factor_freq=1)
    data = digits(dtype=torch.float64)
    for t in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data["train_x"][:16]),
                                          data["train_y"][:16]).backward()
        if t == 2:
            before = copy.deepcopy(opt.state_dict())
            weights = [p.detach().clone() for p in model.parameters()]
            next(model.parameters()).grad[0, 0] = float("nan")
        opt.step()
    assert opt.skipped_steps == opt.core.skipped_steps == 1 and opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    after = opt.state_dict()
    assert after["hpcqn"]["skipped_steps"] == 1
    for key in ("inner", "hpcqn"):
        before_flat = {k: v for k, v in before[key].items() if k != "skipped_steps"}
        after_flat = {k: v for k, v in after[key].items() if k != "skipped_steps"}
        assert repr(before_flat) == repr(after_flat)
    fresh = make(make_model("mlp", hidden=8, dtype=torch.float64), SERIAL, lr=0.1,
                 factor_freq=1)
    fresh.load_state_dict(after)
    assert fresh.skipped_steps == 1


def test_the_hybrid_switch_leaves_non_finite_losses_out_of_its_window():
    from hpcqn.optimizers.mkor import HybridSwitch

    switch, reference = HybridSwitch(2, 0.5), HybridSwitch(2, 0.5)
    for loss in (1.0, 0.9, float("nan"), 0.8, float("inf"), 0.7):
        switch.observe(loss)
    for loss in (1.0, 0.9, 0.8, 0.7):
        reference.observe(loss)
    assert switch.losses == reference.losses and switch.skipped_losses == 2
    assert switch.steps == 6 and switch.last_decrease == reference.last_decrease


class Mixed(nn.Module):
    """A conv, a linear layer without bias, a linear layer whose bias is frozen, one
    unused layer and a plain linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.nobias = nn.Linear(48, 20, bias=False)
        self.frozen = nn.Linear(20, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.frozen(torch.relu(self.nobias(h)))))


@pytest.mark.parametrize("frozen_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_inplace_path_equals_the_core_path(dtype, frozen_bias):
    """The in-place preconditioning path (default options) and the core's path (forced)
    give the same parameters after 25 steps (factor updates every 3), with layers of
    every kind (a frozen bias sends the whole step to the core's path: then both runs
    take it)."""
    torch.manual_seed(3)
    x = torch.randn(8, 1, 4, 4, dtype=dtype)
    y = torch.randint(0, 4, (8,))
    runs = []
    for force_core in (False, True):
        torch.manual_seed(4)
        model = Mixed().to(dtype)
        model.frozen.bias.requires_grad_(not frozen_bias)
        opt = ht.MKOR(model, SERIAL, lr=0.05, factor_freq=3)
        if force_core:
            opt._inplace_plan = lambda: None
        plans = []
        for _ in range(25):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y).backward()
            plans.append(opt._inplace_plan() is not None)
            opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()], plans))
    (fast, fast_plans), (core, core_plans) = runs
    assert all(fast_plans) == (not frozen_bias) and not any(core_plans)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(fast, core, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol)
    assert model.unused.weight.grad is None


def test_the_inplace_path_follows_replaced_factors():
    """Loading a state replaces the factor arrays and a deepcopy copies them: the in-place
    path must use the new ones (stale factors would change the steps)."""
    torch.manual_seed(5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = ht.MKOR(model, SERIAL, lr=0.1, factor_freq=1)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    train(model, opt, 4)
    saved = copy.deepcopy(opt.state_dict())
    model_saved = copy.deepcopy(model.state_dict())
    copied_model, copied = copy.deepcopy([model, opt])
    train(model, opt, 3)
    reference = [p.detach().clone() for p in model.parameters()]
    train(copied_model, copied, 3)
    for a, b in zip(copied_model.parameters(), reference, strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.numpy())
    model.load_state_dict(model_saved)
    opt.load_state_dict(saved)
    train(model, opt, 3)
    for a, b in zip(model.parameters(), reference, strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.numpy())


def test_hooks_exist_only_while_recording():
    """Non-recording steps run the model without forward hooks (torch's fast path)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = ht.MKOR(model, SERIAL, lr=0.1, factor_freq=3)
    x = torch.randn(5, 4)
    seen = []
    for _ in range(7):
        seen.append(sum(len(m._forward_hooks) for m in model.modules()))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert seen == [2, 0, 0, 2, 0, 0, 2]


def test_warmup_updates_at_every_step_first_then_every_factor_freq():
    """warmup_steps=5, factor_freq=4: the hooks record and the factors update at steps
    0-4, then 8, 12, 16 (step 4 is both); warmup_steps=0 gives 0, 4, 8, ..."""
    for warmup, expected in ((5, [0, 1, 2, 3, 4, 8, 12, 16]), (0, [0, 4, 8, 12, 16])):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        opt = ht.MKOR(model, SERIAL, lr=0.1, factor_freq=4, warmup_steps=warmup)
        x = torch.randn(5, 4)
        updated, hooked = [], []
        for step in range(18):
            hooked.append(sum(len(m._forward_hooks) for m in model.modules()) > 0)
            before = opt.core.updates
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if opt.core.updates > before:
                updated.append(step)
        assert updated == expected
        assert [k for k, on in enumerate(hooked) if on] == expected


def test_warmup_state_round_trip_mid_warmup_continues_bitwise():
    """Saved at step 4 of a 9-step warm-up (factor_freq 5), the resumed run updates at
    the same steps and ends on the same parameters as one run straight through."""
    data = digits(dtype=torch.float64)
    options = {"optimizer": "adam", "lr": 0.01, "factor_freq": 5, "warmup_steps": 9}
    straight = make_model("cnn", dtype=torch.float64)
    opt = ht.MKOR(straight, SERIAL, **options)
    train_steps(opt, straight, data, 16)
    assert opt.core.updates == 9 + 2  # steps 0-8, then 10 and 15

    first = make_model("cnn", dtype=torch.float64)
    opt1 = ht.MKOR(first, SERIAL, **options)
    train_steps(opt1, first, data, 4)
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict()))
    resumed = make_model("cnn", seed=3, dtype=torch.float64)
    resumed.load_state_dict(saved[0])
    opt2 = ht.MKOR(resumed, SERIAL, **options)
    opt2.load_state_dict(saved[1])
    assert opt2.capture.active  # step 4 is still a warm-up step
    train_steps(opt2, resumed, data, 12, start=4)
    assert opt2.core.updates == opt.core.updates
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_warmup_is_an_option_of_the_job_methods():
    model = make_model("mlp", hidden=8)
    for method in ("mkor", "mkor_h"):
        opt = ht.methods.make(method, model, SERIAL, {"warmup_steps": 7, "lr": 0.1})
        assert opt.core.warmup_steps == 7
    assert ht.methods.options_of("mkor")["warmup_steps"].default == 0


def test_a_step_where_no_preconditioned_layer_has_a_gradient():
    """Only a parameter outside the layers gets a gradient: the steps are torch SGD's
    (momentum 0.9) on it, and the unused layer stays as it was."""
    class OnlyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    torch.manual_seed(8)
    model = OnlyScale()
    reference = copy.deepcopy(model)
    opt = ht.MKOR(model, SERIAL, lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "lin recorded nothing"
        for _ in range(3):  # step 0 updates the factors, steps 1 and 2 do not
            for m, o in ((model, opt), (reference, sgd)):
                o.zero_grad()
                (m(x) ** 2).sum().backward()
                o.step()
            assert model.lin.weight.grad is None
    np.testing.assert_array_equal(model.scale.detach().numpy(),
                                  reference.scale.detach().numpy())
    np.testing.assert_array_equal(model.lin.weight.detach().numpy(),
                                  reference.lin.weight.detach().numpy())


def test_create_graph_gradients_take_the_core_path():
    """Gradients that require grad (backward(create_graph=True)) cannot be viewed in
    place: the core's path preconditions them, the same step as without create_graph."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    results = []
    for create_graph in (False, True):
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        opt = ht.MKOR(model, SERIAL, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward(create_graph=create_graph)
            assert (opt._inplace_plan() is None) == create_graph
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
