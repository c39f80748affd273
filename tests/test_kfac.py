"""K-FAC (hpcqn.optimizers.kfac and hpcqn.torch.KFAC) in one process: the damped
inverse against NumPy's, the preconditioned gradient against the dense
``(G + lambda I)^-1 grad (A + lambda I)^-1`` (and the eigen form against a dense solve
with ``G (x) A + lambda I``), factors from hooks against explicit rows and patches, the KL
clip's closed form, the state round trip, and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, make_model, train  # noqa: E402
from hpcqn.optimizers.kfac import KFAC, damped_eigh, damped_inverse, kl_clip_scale  # noqa: E402

nn = torch.nn
torch.set_num_threads(1)
SERIAL = hpcqn.serial_comm()


def spd(rng, d, rank=None):
    b = rng.standard_normal((d, rank or d))
    return b @ b.T / d


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_damped_inverse_equals_numpy(dtype, rtol):
    rng = np.random.default_rng(0)
    f = spd(rng, 40, rank=10).astype(dtype)  # singular: the damping makes it invertible
    expected = np.linalg.inv(f.astype(np.float64) + 0.01 * np.eye(40))
    got = damped_inverse(f, 0.01)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    np.testing.assert_array_equal(got, got.T)


def test_damped_inverse_of_an_indefinite_matrix_falls_back_to_clipped_eigenvalues():
    f = np.diag([2.0, -1.0, 0.5])  # rounding can make a factor indefinite like this
    np.testing.assert_allclose(damped_inverse(f, 0.1), np.diag([1 / 2.1, 1 / 0.1, 1 / 0.6]),
                               rtol=1e-12)


def core_after_updates(rng, shapes, method, updates=4, decay=0.9, damping=0.05):
    core = KFAC(shapes, SERIAL, inv_freq=1, factor_decay=decay, damping=damping,
                method=method, dtype=np.float64)
    dense = [(np.eye(i), np.eye(o)) for o, i in shapes]
    for _ in range(updates):
        stats, news = [], []
        for d_out, d_in in shapes:
            rows = int(rng.integers(3, 9))
            a, g = rng.standard_normal((rows, d_in)), rng.standard_normal((rows, d_out))
            # g: rows of a mean loss's gradient (per-sample / batch), the batch = rows
            stats.append((a.T @ a, float(rows), g.T @ g / rows**2, float(rows)))
            news.append((a.T @ a / rows, g.T @ g / rows))
        core.update_factors(core.reduce_statistics(stats))
        dense = [(decay * a + (1 - decay) * na, decay * g + (1 - decay) * ng)
                 for (a, g), (na, ng) in zip(dense, news, strict=True)]
    core.update_inverses()
    return core, dense


def test_factors_follow_the_running_average_and_inverse_preconditioning_is_dense():
    rng = np.random.default_rng(1)
    shapes = [(3, 5), (4, 2)]
    core, dense = core_after_updates(rng, shapes, "inverse")
    grads = [rng.standard_normal(s) for s in shapes]
    for k, ((a, g), grad, d) in enumerate(zip(dense, grads, core.precondition(grads),
                                              strict=True)):
        np.testing.assert_allclose(core.factors[k]["A"], a, rtol=1e-12)
        np.testing.assert_allclose(core.factors[k]["G"], g, rtol=1e-12)
        expected = (np.linalg.inv(g + 0.05 * np.eye(len(g))) @ grad
                    @ np.linalg.inv(a + 0.05 * np.eye(len(a))))
        np.testing.assert_allclose(d, expected, rtol=1e-10, atol=1e-12)


def test_eigen_preconditioning_solves_the_damped_kronecker_system():
    """vec(D) = (G (x) A + lambda I)^-1 vec(grad) (row-major vec: grad = G-side rows)."""
    rng = np.random.default_rng(2)
    shapes = [(3, 4)]
    core, [(a, g)] = core_after_updates(rng, shapes, "eigen")
    grad = rng.standard_normal(shapes[0])
    (d,) = core.precondition([grad])
    system = np.kron(g, a) + 0.05 * np.eye(12)
    expected = np.linalg.solve(system, grad.reshape(-1)).reshape(3, 4)
    np.testing.assert_allclose(d, expected, rtol=1e-10, atol=1e-12)
    q, values = damped_eigh(a)
    np.testing.assert_allclose((q * values) @ q.T, a, atol=1e-12)


def test_kl_clip_scale_closed_form():
    d, g = [np.full((2, 2), 3.0)], [np.full((2, 2), 0.5)]
    # <D, g> = 4 * 1.5 = 6; lr 0.1: vg = 0.06; sqrt(1e-3 / 0.06)
    assert kl_clip_scale(d, g, 0.1, 1e-3) == pytest.approx(np.sqrt(1e-3 / 0.06), rel=1e-14)
    assert kl_clip_scale(d, g, 0.1, 1.0) == 1.0  # within the bound: no clipping
    assert kl_clip_scale(d, g, 0.1, 0.0) == 1.0  # kl_clip 0 switches it off
    assert kl_clip_scale([np.zeros((2, 2))], g, 0.1, 1e-3) == 1.0


def test_linear_factors_from_hooks_equal_hand_computed_rows():
    """loss = sum(out^2) / (2B): dL/dout = out / B; per-sample rows = out."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    opt = ht.KFAC(layer, SERIAL, lr=0.1)
    out = layer(x)
    (out.pow(2).sum() / (2 * 7)).backward()
    (a_sum, count, g_sum, batch), = opt._statistics()
    rows = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1).numpy()
    o = out.detach().numpy() / 7
    assert count == 7 and batch == 7
    np.testing.assert_allclose(a_sum, rows.T @ rows, rtol=1e-13)
    np.testing.assert_allclose(g_sum, o.T @ o, rtol=1e-12)
    # The reduction turns the rows into per-sample gradients: G = sum(out out^T) / 7.
    (a, g), = opt.core.reduce_statistics(opt._statistics())
    np.testing.assert_allclose(g, (o * 7).T @ (o * 7) / 7, rtol=1e-12)
    np.testing.assert_allclose(a, rows.T @ rows / 7, rtol=1e-13)


def test_conv_factors_equal_explicit_unfold():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    x = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    opt = ht.KFAC(conv, SERIAL, lr=0.1)
    out = conv(x)
    weights = torch.randn_like(out)
    (out * weights).sum().div(4).backward()  # dL/dout = weights / 4: per-sample = weights
    (a_sum, count, g_sum, batch), = opt._statistics()
    patches = nn.functional.unfold(x, 3, padding=1, stride=2)  # (B, C*9, positions)
    rows = patches.transpose(1, 2).reshape(-1, 18)
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=x.dtype)], 1).numpy()
    grows = weights.permute(0, 2, 3, 1).reshape(-1, 3).numpy() / 4
    assert count == rows.shape[0] == 4 * out.shape[2] * out.shape[3] and batch == 4
    np.testing.assert_allclose(a_sum, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(g_sum, grows.T @ grows, rtol=1e-12)


class Twice(nn.Module):
    """A convolution (or linear layer) applied to two inputs: two recorded calls."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) * self.layer(x.flip(0) * 0.5)


@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
     (5, 3, 9, 7)),
    (lambda: nn.Conv2d(2, 3, 2, stride=3, bias=False), (4, 2, 8, 8)),
    (lambda: nn.Conv2d(2, 3, 1), (3, 2, 5, 4)),
    (lambda: nn.Linear(6, 4), (5, 3, 6)),  # rows: batch x positions
    (lambda: nn.Linear(6, 4, bias=False), (7, 6)),
])
@pytest.mark.parametrize("calls", [1, 2])
def test_second_moments_equal_explicit_unfold_in_float64(layer, shape, calls):
    """sum a a^T and sum g g^T from the hooks (float32, no rows formed) against rows built
    explicitly in float64 (nn.functional.unfold, a ones column, one matrix product), for
    strided, dilated, padded, bias-free and 1x1 convolutions and linear layers on 3-d
    input, called once or twice per forward; MKOR's rows are those rows too."""
    torch.manual_seed(3)
    module = layer()
    model = module if calls == 1 else Twice(module)
    opt = ht.KFAC(model, SERIAL, lr=0.1)
    x = torch.randn(*shape)
    inputs = [x] if calls == 1 else [x, x.flip(0) * 0.5]
    out = model(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    # the output gradients of each call, independently: d(sum(out * w))/d(call output)
    outs = [module(v).detach().requires_grad_() for v in inputs]
    total = outs[0] if calls == 1 else outs[0] * outs[1]
    g_calls = torch.autograd.grad((total * weights).sum(), outs)

    def explicit_rows(v):
        v = v.double()
        if isinstance(module, nn.Conv2d):
            p = nn.functional.unfold(v, module.kernel_size, dilation=module.dilation,
                                     padding=module.padding, stride=module.stride)
            r = p.transpose(1, 2).reshape(-1, p.shape[1])
        else:
            r = v.reshape(-1, v.shape[-1])
        if module.bias is not None:
            r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], 1)
        return r

    def explicit_grad_rows(g):
        g = g.double()
        if isinstance(module, nn.Conv2d):
            return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    # the calls in the order the backward pass recorded them (for the rows below)
    recorded = opt.capture.inputs[opt.capture.names[0]]
    order = [0] if calls == 1 else ([0, 1] if torch.equal(recorded[0], inputs[0]) else [1, 0])
    a = torch.cat([explicit_rows(inputs[i]) for i in order])
    g = torch.cat([explicit_grad_rows(g_calls[i]) for i in order])
    (a_sum, count, g_sum, samples), = opt._statistics()
    # samples: a convolution's images (one forward pass), a linear layer's rows (tokens)
    assert count == a.shape[0]
    assert samples == (shape[0] if isinstance(module, nn.Conv2d) else a.shape[0])
    assert a_sum.dtype == np.float32 and a_sum.shape == (a.shape[1], a.shape[1])
    np.testing.assert_allclose(a_sum, (a.T @ a).numpy(), rtol=2e-5, atol=2e-5 * a.abs().max()
                               .item() ** 2 * a.shape[0] ** 0.5)
    np.testing.assert_allclose(g_sum, (g.T @ g).numpy(), rtol=2e-5, atol=2e-5 * g.abs().max()
                               .item() ** 2 * g.shape[0] ** 0.5)
    # A loss scale divides the gradient rows (G by its square).
    scaled = opt.capture.second_moments(opt.capture.names[0], 4.0)[2].numpy()
    np.testing.assert_allclose(scaled, (g.T @ g).numpy() / 16, rtol=2e-5,
                               atol=2e-5 * g.abs().max().item() ** 2 * g.shape[0] ** 0.5)
    # MKOR's rows from the same recording are the explicit rows.
    a_rows, g_rows, _ = opt.capture.rows(opt.capture.names[0])
    torch.testing.assert_close(a_rows.double(), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_rows.double(), g, rtol=1e-6, atol=1e-6)


def test_output_gradient_is_the_layers_own_under_an_inplace_activation():
    """nn.ReLU(inplace=True) after the layer rewrites its output: G still comes from the
    gradient of the layer's output (before the activation)."""
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.ReLU(inplace=True))
    opt = ht.KFAC(model, SERIAL, lr=0.1)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    weights = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    (model(x) * weights).sum().backward()
    pre = conv(x).detach()
    g = (weights * (pre > 0)).permute(0, 2, 3, 1).reshape(-1, 3)
    (_, _, g_sum, _), = opt._statistics()
    np.testing.assert_allclose(g_sum, (g.T @ g).numpy(), rtol=1e-12)


def test_hooks_keep_references_not_copies():
    """On a recording step the hooks hold the layer's input and its output gradient
    themselves (no rows formed in forward/backward)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    opt = ht.KFAC(conv, SERIAL, lr=0.1)
    x = torch.randn(4, 2, 5, 5)
    seen = {}
    out = conv(x)
    out.register_hook(lambda g: seen.setdefault("grad", g))
    out.sum().backward()
    (stored_x,), (stored_g,) = opt.capture.inputs[""], opt.capture.grads[""]
    assert stored_x.data_ptr() == x.data_ptr()
    assert stored_g.shape == out.shape and torch.equal(stored_g, seen["grad"])
    opt.step()
    assert not opt.capture.inputs and not opt.capture.grads


@pytest.mark.parametrize("kl_clip", [0.0, 1e-6])
def test_step_applies_the_dense_preconditioned_gradient(kl_clip):
    """One SGD step without momentum moves [W | b] by -lr * nu * (G+lI)^-1 grad (A+lI)^-1,
    with the factors after the first update (0.95 I + 0.05 F_new) and nu the KL clip."""
    torch.manual_seed(2)
    layer = nn.Linear(5, 3).double()
    lr, damping = 0.1, 0.01
    opt = ht.KFAC(layer, SERIAL, lr=lr, damping=damping, kl_clip=kl_clip,
                  optimizer_options={"momentum": 0.0})
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    before = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().numpy().copy()
    out = layer(x)
    nn.functional.mse_loss(out, y).backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).numpy().copy()
    per_sample = (2 * (out - y) / 3).detach().numpy()  # d(sum of squares / 3)/dout per row
    rows = torch.cat([x, torch.ones(9, 1, dtype=x.dtype)], 1).numpy()
    a = 0.95 * np.eye(6) + 0.05 * rows.T @ rows / 9
    g = 0.95 * np.eye(3) + 0.05 * per_sample.T @ per_sample / 9
    d = np.linalg.inv(g + damping * np.eye(3)) @ grad @ np.linalg.inv(a + damping * np.eye(6))
    nu = min(1.0, np.sqrt(kl_clip / (lr**2 * (d * grad).sum()))) if kl_clip else 1.0
    opt.step()
    after = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().numpy()
    np.testing.assert_allclose(after, before - lr * nu * d, rtol=1e-10, atol=1e-13)
    assert opt.last_clip == pytest.approx(nu, rel=1e-12)
    if kl_clip:
        assert nu < 1.0  # the clip is active in this case


def batches(data, steps, size=32):
    for t in range(steps):
        index = torch.arange(t * size, (t + 1) * size) % data["train_y"].numel()
        yield data["train_x"][index], data["train_y"][index]


def run_steps(model, opt, data, start, stop):
    for t, (x, y) in enumerate(batches(data, stop)):
        if t < start:
            continue
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_state_dict_round_trip_continues_bitwise(method):
    data = digits(dtype=torch.float64)
    options = {"lr": 0.05, "inv_freq": 3, "factor_freq": 1, "damping": 0.1, "method": method}
    model = make_model("cnn", dtype=torch.float64)
    opt = ht.KFAC(model, SERIAL, **options)
    run_steps(model, opt, data, 0, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run_steps(model, opt, data, 5, 11)
    fresh = make_model("cnn", seed=7, dtype=torch.float64)
    fresh.load_state_dict(saved_model)
    fresh_opt = ht.KFAC(fresh, SERIAL, **options)
    fresh_opt.load_state_dict(saved_opt)
    run_steps(fresh, fresh_opt, data, 5, 11)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    other = "eigen" if method == "inverse" else "inverse"
    with pytest.raises(ValueError, match="method"):
        ht.KFAC(make_model("cnn", dtype=torch.float64), SERIAL,
                **{**options, "method": other}).load_state_dict(saved_opt)
    with pytest.raises(ValueError, match="layers"):
        ht.KFAC(make_model("mlp", dtype=torch.float64), SERIAL, **options).load_state_dict(
            saved_opt)
    with pytest.raises(ValueError, match="not an hpcqn.torch.KFAC"):
        fresh_opt.load_state_dict(ht.MKOR(fresh, SERIAL).state_dict())


def test_bad_input_is_refused_clearly():
    model = make_model("mlp")
    with pytest.raises(ValueError, match="multiple of factor_freq"):
        ht.KFAC(model, SERIAL, inv_freq=10, factor_freq=3)
    with pytest.raises(ValueError, match="damping"):
        ht.KFAC(model, SERIAL, damping=0.0)
    with pytest.raises(ValueError, match="method"):
        ht.KFAC(model, SERIAL, method="cholesky")
    with pytest.raises(ValueError, match="kl_clip"):
        ht.KFAC(model, SERIAL, kl_clip=-1.0)
    with pytest.raises(ValueError, match="placement"):
        ht.KFAC(model, SERIAL, placement="everywhere")
    with pytest.raises(TypeError, match="closure"):
        ht.KFAC(model, SERIAL).step(0.0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ht.KFAC(nn.Sequential(nn.ReLU()), SERIAL)
    core = KFAC([(2, 3)], SERIAL)
    with pytest.raises(RuntimeError, match="before the first update_inverses"):
        core.precondition([np.zeros((2, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="expected"):
        core.reduce_statistics([(np.zeros((2, 2)), 1.0, np.zeros((2, 2)), 1.0)])
    with pytest.raises(ValueError, match="entries"):
        core.reduce_statistics([(np.zeros((3, 3)), 1.0, np.zeros((2, 2)))])


def test_digits_mlp_reaches_95_percent():
    result = train("kfac", SERIAL, model_name="mlp", epochs=4, lr_schedule="cosine",
                   options={"lr": 0.1, "damping": 0.1}, log=False)
    assert result["records"][-1]["test_accuracy"] >= 0.95
    assert result["optimizer"].core.inverse_updates == -(-result["records"][-1]["steps"] // 10)
