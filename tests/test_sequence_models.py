"""hpcqn.torch on the models people train: sequence models whose layers see ``(B, T, d)``
inputs in any layout, gradient accumulation, ``nn.MultiheadAttention``, tied weights,
the table of who preconditions what, and a run whose every step is skipped. References:
the same data in another layout, one backward over the whole batch, the module tree."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.torch.data import DivergenceError  # noqa: E402

SERIAL = hpcqn.serial_comm()
torch.set_num_threads(1)


class TokenMLP(nn.Module):
    """Two linear layers applied to the last dimension: the same function of every token
    whatever the layout of the leading dimensions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 5)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def build(kind, model, comm=SERIAL, **options):
    if kind == "mlbfgs":
        return ht.MLBFGS(model.parameters(), comm, lr=0.1, **options)
    if kind == "kfac":
        return ht.KFAC(model, comm, lr=0.1, inv_freq=2, **options)
    return ht.MKOR(model, comm, lr=0.1, factor_freq=2, hybrid=kind == "mkor_h",
                   hybrid_window=3, hybrid_threshold=0.2, **options)


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()


@pytest.mark.parametrize("kind", ["mkor", "kfac"])
def test_statistics_do_not_depend_on_the_layout_of_the_tokens(kind):
    """(B, T, d), (T, B, d) and (B*T, d) are the same tokens: the same parameters to 1e-12
    after 30 steps (float64), and the factors really moved from the identity on both
    sides (the output side was left at the identity when it was scaled by B)."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 7, 6, generator=gen, dtype=torch.float64),
                torch.randn(4, 7, 5, generator=gen, dtype=torch.float64)) for _ in range(30)]
    layouts = {"BTd": lambda t: t, "TBd": lambda t: t.transpose(0, 1),
               "flat": lambda t: t.reshape(-1, t.shape[-1])}
    results = {}
    for name, layout in layouts.items():
        model = TokenMLP().double()
        opt = build(kind, model)
        for x, y in batches:
            opt.zero_grad()
            loss = ((model(layout(x)) - layout(y)) ** 2).mean()
            loss.backward()
            opt.step(loss=loss.detach())
        results[name] = (flat(model), opt)
    for name in ("TBd", "flat"):
        np.testing.assert_allclose(results[name][0], results["BTd"][0], rtol=0, atol=1e-12)
    core = results["BTd"][1].core
    if kind == "kfac":
        g = core.factors[1]["G"]  # the output side of the last layer
        assert np.abs(g - np.eye(g.shape[0])).max() > 1e-2
    else:
        linv = core.factors[1][0].matrix()
        assert np.linalg.cond(linv) > 1.01


def accumulate(kind, model, batches, parts, comm=SERIAL):
    """Train on ``batches`` with each batch split into ``parts`` micro-batches (each loss
    weighted by its share of the batch), one step per batch."""
    opt = build(kind, model, comm)
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for index in np.array_split(np.arange(x.shape[0]), parts):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            (loss * (len(index) / x.shape[0])).backward()
            total += float(loss) * len(index) / x.shape[0]
        opt.step(loss=torch.tensor(total))
    return flat(model), opt


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 10)).double()


@pytest.mark.parametrize("kind", ["mkor", "mkor_h", "kfac"])
@pytest.mark.parametrize("parts", [2, 3])
def test_gradient_accumulation_equals_one_backward_over_the_batch(kind, parts):
    """Several backward calls before one step accumulate the statistics as .grad
    accumulates the gradients: the same parameters as one backward over the whole batch
    (float64, 1e-10), for a CNN (convolution samples are images) and its linear head."""
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(15, 1, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 10, (15,), generator=gen)) for _ in range(12)]
    whole, opt_whole = accumulate(kind, cnn(), batches, 1)
    split, opt_split = accumulate(kind, cnn(), batches, parts)
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-10)
    assert opt_whole.steps == opt_split.steps == 12
    if kind == "mkor_h":
        assert opt_split.switch.switched_at == opt_whole.switch.switched_at


def test_a_layer_applied_twice_in_one_pass_counts_its_images_once():
    """A convolution called twice in one forward pass sees the same images twice: its
    samples are the batch, not twice the batch; two passes of half the batch each add up
    to the batch."""
    conv = nn.Conv2d(1, 2, 3).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) + self.conv(x * 0.5)

    model = Twice()
    opt = ht.KFAC(model, SERIAL)
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    model(x).sum().backward()
    assert opt.capture.samples("conv") == 6
    opt.zero_grad()
    model(x[:3]).sum().backward()
    model(x[3:]).sum().backward()
    assert opt.capture.samples("conv") == 6


class TinyGPT(nn.Module):
    """A decoder block with nn.MultiheadAttention, a LayerNorm, an embedding and a head
    whose weight is the embedding's (tied)."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        h = self.block(self.wte(idx), is_causal=False)
        return self.head(self.ln(h))


@pytest.mark.parametrize("kind", ["mkor", "kfac"])
def test_attention_embeddings_norms_and_tied_weights_are_first_order(kind):
    """Every parameter is accounted for: the feed-forward layers are preconditioned; Q, K,
    V (in_proj) and out_proj of nn.MultiheadAttention, the embedding, the LayerNorms and
    the tied head are the first-order optimizer's, each with its reason; every listed
    layer records statistics on every factor step (none listed that records nothing)."""
    model = TinyGPT().double()
    opt = build(kind, model)
    assert opt.capture.names == ["block.linear1", "block.linear2"]
    table = {name: who for name, _, who in opt.capture.describe()}
    assert set(table) == {name for name, _ in model.named_parameters()}
    assert "F.multi_head_attention_forward" in table["block.self_attn.in_proj_weight"]
    assert "out_proj" in table["block.self_attn.out_proj.weight"]
    assert "nn.Embedding" in table["wte.weight"]
    assert "normalisation" in table["ln.weight"] and "normalisation" in table["block.norm1.bias"]
    assert table["block.linear1.weight"].startswith("Kronecker factors of layer")
    text = opt.describe()
    assert "4 of 15 parameters in 2 layers preconditioned" in text
    assert "tied: also head.weight" in table["wte.weight"]
    # the tied head: not preconditioned, with the embedding named
    assert "head" in opt.capture.reasons and "wte.weight" in opt.capture.reasons["head"]
    idx = torch.randint(0, 11, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "recorded nothing" warning: all layers record
        for _ in range(4):
            opt.zero_grad()
            out = model(idx)
            loss = nn.functional.cross_entropy(out.reshape(-1, 11), idx.reshape(-1))
            loss.backward()
            opt.step(loss=loss.detach())
    missing = opt.core.missing
    assert not missing, missing


def test_describe_is_printed_by_rank_zero_with_verbose(capsys):
    model = TinyGPT().double()
    opt = ht.MKOR(model, SERIAL, verbose=True)
    assert capsys.readouterr().out.strip() == opt.describe()


@pytest.mark.parametrize("kind", ["mkor", "kfac", "mlbfgs"])
def test_a_diverged_run_is_reported_then_raises_when_asked(kind):
    """Every step skipped (an infinite learning rate makes the parameters overflow, then
    the gradients): a warning names the count and the learning rate after
    divergence_steps skips and again when the count doubles; divergence="raise" raises
    on the step that reaches the count."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))

    def train(opt, model, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for p in model.parameters():
                p.grad.fill_(math.nan)  # a diverged gradient on every step
            opt.step(**({} if kind == "mlbfgs" else {"loss": torch.tensor(1.0)}))

    model = nn.Sequential(nn.Linear(6, 5)).double()
    opt = build(kind, model, divergence_steps=3)
    with pytest.warns(RuntimeWarning, match=r"3 consecutive steps skipped.*lr=0.1") as seen:
        train(opt, model, 7)
    messages = [str(w.message) for w in seen if "consecutive" in str(w.message)]
    assert [m.split(" consecutive")[0].rsplit(" ", 1)[-1] for m in messages] == ["3", "6"]
    assert opt.skipped_steps == 7
    model = nn.Sequential(nn.Linear(6, 5)).double()
    opt = build(kind, model, divergence_steps=2, divergence="raise")
    with pytest.raises(DivergenceError, match="2 consecutive steps skipped"):
        train(opt, model, 5)
    assert opt.skipped_steps == 2


def test_fsdp_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="divergence"):
        ht.MKOR(TokenMLP(), SERIAL, divergence="ignore")
    with pytest.raises(ValueError, match="divergence_steps"):
        ht.KFAC(TokenMLP(), SERIAL, divergence_steps=0)


@pytest.mark.parametrize("kind", ["mkor", "kfac"])
def test_torch_compile_keeps_two_graphs_and_the_eager_steps(kind):
    """A compiled model (dynamo's eager backend: its guards and graph breaks, no code
    generation) with hooks that record every other step: the same parameters as the
    plain model, the hooks stay registered once compiled, and dynamo keeps a bounded set
    of graphs (recording and not) instead of recompiling up to its limit whenever the
    hooks came and went (9 frames compiled before, the cache limit)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 7, 6, generator=gen, dtype=torch.float64),
             torch.randn(6, 7, 5, generator=gen, dtype=torch.float64)) for _ in range(24)]

    def train(compiled):
        model = TokenMLP().double()
        forward = torch.compile(model, backend="eager") if compiled else model
        options = {"inv_freq": 4, "factor_freq": 2} if kind == "kfac" else {"factor_freq": 4}
        opt = (ht.KFAC if kind == "kfac" else ht.MKOR)(forward, SERIAL, lr=0.1, **options)
        for x, y in data:
            opt.zero_grad()
            ((forward(x) - y) ** 2).mean().backward()
            opt.step()
        return flat(model), opt

    eager, _ = train(False)
    compiled, opt = train(True)
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-12)
    assert opt.capture.persistent and opt.capture._handles
    # the recording and the plain variants (9, dynamo's cache limit, before)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    # graph breaks only where the hooks record (eagerly, on recording steps)
    assert all("_record" in reason or "_count" in reason for reason in counters["graph_break"])
