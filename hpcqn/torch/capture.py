"""Layer statistics for Kronecker-factored methods (MKOR, K-FAC): forward and backward
hooks on ``nn.Linear`` and ``nn.Conv2d`` that, while switched on, record each layer's
inputs and the gradients of its outputs as rows of a matrix.

- ``nn.Linear`` on inputs ``(B, ..., d_in)``: input rows ``x.reshape(-1, d_in)``, output
  gradient rows ``grad.reshape(-1, d_out)``.
- ``nn.Conv2d``: input rows are the unfolded patches (``torch.nn.functional.unfold``
  with the layer's kernel, dilation, padding and stride), one row per sample and output
  position, ``C_in * kh * kw`` wide; output gradient rows one per sample and position.
- With a bias, a column of ones is appended to the input rows, so the layer's gradient
  matrix is ``[W | b]`` (``d_out x (d_in + 1)``).

Which layers (:class:`LayerCapture`): every ``nn.Linear`` and ``nn.Conv2d`` whose forward
is where its weight is used, except those named by ``skip_layers``, convolutions that
are grouped or not zero-padded, layers whose weight does not require a gradient, the
``out_proj`` of ``nn.MultiheadAttention`` (that module calls
``F.multi_head_attention_forward``, which applies ``out_proj`` and the packed Q, K, V
projection ``in_proj_weight`` with ``F.linear``: no module forward runs, so no hook sees
their inputs), and layers with a parameter held by another module too (tied weights,
e.g. a language model's head sharing the embedding's matrix: the hooks see only the
head's uses, so its factors would precondition a gradient that also holds the
embedding's). Everything else (embeddings, normalisation layers, the attention
projections above, biases of skipped layers) is the first-order optimizer's;
:meth:`LayerCapture.describe` lists every parameter with its handler and the reason.

Samples: a mean loss makes each recorded row of output gradients ``1/N`` of a per-sample
gradient, and the optimizers undo it with ``N`` (:meth:`LayerCapture.samples`). For a
linear layer the samples are its rows: every token of a sequence model (``B*T`` rows
for inputs ``(B, T, d)``, ``(T, B, d)`` or ``(B*T, d)`` alike, so the statistics do not
depend on the layout), the mean loss being the mean over tokens as a language model's
is. For a convolution they are the images: the batch size, summed over the forward
passes recorded since the last step. Several forward/backward passes before one
``step()`` (gradient accumulation, each loss divided by their number) therefore give
the statistics of one pass over the whole batch, as ``.grad`` holds its gradient.

The forward hooks are registered only while :attr:`LayerCapture.active` is true (and
record only while autograd does), so steps that need no statistics run the model's plain
forward and backward. On the steps that record, the hooks keep only
references: the layer's input and the gradient of its output as autograd hands them over
(no copy; converted to the parameters' dtype only under autocast). The rows
(:meth:`LayerCapture.rows`, MKOR's) or the second moments ``sum a a^T`` and ``sum g g^T``
(:meth:`LayerCapture.second_moments`, K-FAC's: one matrix product per side and layer on
columns built in one copy, without ``unfold``'s layout) are built from them in the
optimizer's step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d)
# Why a parameter is the first-order optimizer's, by the class of the module holding it
FIRST_ORDER_BY_DESIGN = {
    nn.Embedding: "nn.Embedding: first-order by design",
    nn.LayerNorm: "normalisation layer: first-order by design",
    nn.GroupNorm: "normalisation layer: first-order by design",
    nn.modules.batchnorm._BatchNorm: "normalisation layer: first-order by design",
    nn.MultiheadAttention: "nn.MultiheadAttention computes Q, K, V with F.linear inside "
                           "F.multi_head_attention_forward (no hook sees it)",
}


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile(model)`` returns."""
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(the model to hook, its DistributedDataParallel wrapper or None)``: a DDP model
    is hooked inside ``.module`` (the layer names are the plain model's); an FSDP model
    (or one with FSDP inside) is refused with ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ddp = None
    if _is_compiled(model):  # torch.compile(model): hook the original modules
        model = model._orig_mod
    if isinstance(model, nn.parallel.DistributedDataParallel):
        ddp, model = model, model.module
    if _is_compiled(model):
        model = model._orig_mod
    try:
        from torch.distributed import fsdp
        sharded = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule")
                        if hasattr(fsdp, n))
    except ImportError:  # pragma: no cover - torch without distributed support
        sharded = ()
    for name, module in model.named_modules():
        if sharded and isinstance(module, sharded):
            where = f" (module {name!r})" if name else ""
            raise TypeError(f"an FSDP-sharded model{where} is not supported: the Kronecker "
                            f"factors need each layer's whole weight on every rank; wrap the "
                            f"model in DistributedDataParallel, or pass the plain model")
    return model, ddp


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


class LayerCapture:
    """Hooks on every supported layer of ``model`` not named by ``skip_layers`` (exact
    module names or regular expressions matched against the whole name)."""

    def __init__(self, model: nn.Module, skip_layers: Iterable[str] = ()):
        compiled = _is_compiled(model)
        model, _ = unwrap(model)
        if isinstance(skip_layers, str):
            skip_layers = [skip_layers]
        patterns = list(skip_layers)
        for p in patterns:
            re.compile(p)  # a bad pattern fails here, with re's message
        self.model = model
        self.layers: list[tuple[str, nn.Module]] = []
        self.skipped: list[str] = []
        self.unsupported: list[str] = []
        # Why each supported layer left out is left out, by layer name
        self.reasons: dict[str, str] = {}
        holders: dict[int, list[str]] = {}  # parameter -> the modules holding it
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                holders.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
        attention = [name for name, m in model.named_modules()
                     if isinstance(m, nn.MultiheadAttention)]
        for name, module in model.named_modules():
            if not isinstance(module, SUPPORTED):
                continue
            shared = [other for p in (module.weight, module.bias) if p is not None
                      for other in holders[id(p)] if other.rpartition(".")[0] != name]
            if _skipped(name, patterns):
                self.skipped.append(name)
                self.reasons[name] = "named by skip_layers"
                continue
            if isinstance(module, nn.Conv2d) and (module.groups != 1
                                                  or module.padding_mode != "zeros"
                                                  or isinstance(module.padding, str)):
                reason = ("grouped, not zero-padded or 'same'/'valid'-padded convolution "
                          "(not supported)")
            elif any(name.startswith(a + ".") for a in attention):
                reason = ("out_proj of nn.MultiheadAttention: applied with F.linear inside "
                          "F.multi_head_attention_forward, its forward never runs")
            elif shared:
                reason = f"tied weights: a parameter is also held by {', '.join(shared)}"
            elif not module.weight.requires_grad:
                reason = "its weight does not require a gradient"
            else:
                self.layers.append((name, module))
                continue
            self.unsupported.append(name)
            self.reasons[name] = reason
        if not self.layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition "
                             f"(skipped: {self.skipped}, not preconditioned: "
                             f"{self.reasons})")
        self.modules = dict(self.layers)
        # Per layer, one entry per call that was back-propagated: the input and the
        # gradient of the output, as tensors (no rows formed yet), and per forward pass
        # of the model (numbered by ``passes``) the batch size of its calls.
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.batches: dict[str, dict[int, int]] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.passes = 0
        # hooks kept registered between recording steps (set once a hook runs under
        # torch.compile, or for a model given compiled)
        self.persistent = compiled
        self._handles: list[Any] = []
        self._active = False
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether the hooks record; setting it registers or removes the forward hooks (a
        module with no hook takes torch's fast call path). Once the model runs under
        ``torch.compile`` (:attr:`persistent`), the hooks stay registered and only the
        flag changes: the compiled model then keeps two variants of its graph, recording
        and not, instead of recompiling whenever hooks come and go."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)
        if self._active and not self._handles and not self._removed:
            self._handles = [self.model.register_forward_pre_hook(_PassCounter(self))]
            self._handles += [m.register_forward_hook(self._forward_hook(n))
                              for n, m in self.layers]
        elif not self._active and self._handles and not self.persistent:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(d_out, d_in)`` of every layer's gradient matrix (bias column included)."""
        return [(m.weight.shape[0], m.weight[0].numel() + (m.bias is not None))
                for _, m in self.layers]

    def params(self) -> list[torch.Tensor]:
        return [p for _, m in self.layers for p in (m.weight, m.bias) if p is not None]

    def clear(self) -> None:
        self.inputs, self.batches, self.grads = {}, {}, {}

    def samples(self, name: str) -> int:
        """What a mean loss divided each recorded output-gradient row of a layer by (see
        the module docs): its rows for a linear layer, the batch sizes of the recorded
        forward passes summed for a convolution."""
        if isinstance(self.modules[name], nn.Conv2d):
            return sum(self.batches[name].values())
        return sum(g.numel() // g.shape[-1] for g in self.grads[name])

    def describe(self, first_order: str = "the first-order optimizer",
                 preconditioner: str = "Kronecker factors") -> list[tuple[str, tuple[int, ...],
                                                                          str]]:
        """Every parameter of the model: ``(name, shape, who handles it)``; frozen ones
        (``requires_grad=False``) are listed as frozen."""
        layer_of = {id(p): name for name, m in self.layers for p in (m.weight, m.bias)
                    if p is not None}
        holders: dict[int, list[tuple[str, nn.Module]]] = {}
        for mname, m in self.model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                holders.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname,
                                                      m))

        def reason(module_name: str, module: nn.Module) -> str:
            if module_name in self.reasons:
                return self.reasons[module_name]
            for klass, why in FIRST_ORDER_BY_DESIGN.items():
                if isinstance(module, klass):
                    return why
            return "not in an nn.Linear or nn.Conv2d"

        rows = []
        for pname, p in self.model.named_parameters():
            shape = tuple(p.shape)
            if not p.requires_grad:
                rows.append((pname, shape, "frozen (requires_grad=False)"))
            elif id(p) in layer_of:
                rows.append((pname, shape, f"{preconditioner} of layer {layer_of[id(p)]!r}"))
            else:
                (_, module), *others = holders[id(p)]
                why = reason(pname.rpartition(".")[0], module)
                if others:
                    why += f"; tied: also {', '.join(name for name, _ in others)}"
                rows.append((pname, shape, f"{first_order}: {why}"))
        return rows

    def remove(self) -> None:
        """Remove the hooks for good."""
        self.active = False
        self._removed = True

    def _forward_hook(self, name: str) -> Any:
        return _ForwardHook(self, name)

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``(input rows, output-gradient rows, samples)`` recorded for a layer since the
        last :meth:`clear` (:meth:`samples`), or None when its hooks did not both fire."""
        if name not in self.inputs or name not in self.grads:
            return None
        module = self.modules[name]
        a = [input_rows(module, x) for x in self.inputs[name]]
        g = [output_grad_rows(module, grad) for grad in self.grads[name]]
        return (torch.cat(a) if len(a) > 1 else a[0], torch.cat(g) if len(g) > 1 else g[0],
                self.samples(name))

    def second_moments(self, name: str, grad_scale: float = 1.0
                       ) -> tuple[torch.Tensor, int, torch.Tensor, int] | None:
        """``(sum a a^T, rows, sum g g^T, samples)`` over the rows :meth:`rows` would
        give (``g`` divided by ``grad_scale``), or None when the layer's hooks did not
        both fire: one matrix product per side and recorded call, on the columns
        :func:`input_columns` and :func:`output_grad_columns` build in one copy (none
        for a linear layer's gradients)."""
        if name not in self.inputs or name not in self.grads:
            return None
        module = self.modules[name]
        a_sum = g_sum = None
        count = 0
        for x in self.inputs[name]:
            cols = input_columns(module, x)
            product = cols @ cols.T
            a_sum = product if a_sum is None else a_sum.add_(product)
            count += cols.shape[1]
        for grad in self.grads[name]:
            cols = output_grad_columns(module, grad)
            if grad_scale != 1.0:
                cols = cols / grad_scale
            product = cols @ cols.T
            g_sum = product if g_sum is None else g_sum.add_(product)
        return a_sum, count, g_sum, self.samples(name)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows (unfolded patches for a convolution), with a ones column
    when the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation,
                                       padding=module.padding, stride=module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def output_grad_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a layer's output as rows (one per sample and position)."""
    if isinstance(module, nn.Conv2d):
        return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return grad.reshape(-1, grad.shape[-1])


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`input_rows`, ``(d_in, rows)`` (ones row included), built
    in one copy. A convolution's patches come from views of the zero-padded input
    (``Tensor.unfold`` per spatial dimension), copied once into this layout (cheaper than
    ``nn.functional.unfold`` followed by a transpose)."""
    if not isinstance(module, nn.Conv2d):
        return input_rows(module, x).T
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    (ph, pw), (sh, sw) = module.padding, module.stride
    if ph or pw:
        x = nn.functional.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    if dh != 1 or dw != 1:
        patches = patches[..., ::dh, ::dw]
    # (B, C, out_h, out_w, kh, kw) -> (C, kh, kw, B, out_h, out_w): columns in the order
    # of input_rows's rows (sample, then position)
    patches = patches.permute(1, 4, 5, 0, 2, 3)
    width = patches.shape[0] * kh * kw
    cols = x.new_empty(width + (module.bias is not None), patches[0, 0, 0].numel())
    cols[:width].view(patches.shape).copy_(patches)
    if module.bias is not None:
        cols[width].fill_(1.0)
    return cols


def output_grad_columns(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`output_grad_rows`: ``(d_out, rows)``."""
    if isinstance(module, nn.Conv2d):
        return grad.transpose(0, 1).reshape(grad.shape[1], -1)
    return output_grad_rows(module, grad).T


def grad_matrix(module: nn.Module) -> torch.Tensor | None:
    """``[W.grad | b.grad]`` as ``(d_out, d_in)``, or None when the weight has no
    gradient."""
    weight, bias = module.weight, module.bias
    if weight.grad is None:
        return None
    g = weight.grad.reshape(weight.shape[0], -1)
    if bias is not None:
        b = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        g = torch.cat([g, b.reshape(-1, 1)], dim=1)
    return g


@torch.no_grad()
def set_grad_matrix(module: nn.Module, d: torch.Tensor) -> None:
    """Write ``(d_out, d_in)`` back into the weight's (and bias's) gradient; a bias
    without gradient (frozen, or no gradient on any rank) keeps ``.grad = None``, so the
    first-order optimizer leaves it where it is, as torch's optimizers do."""
    weight, bias = module.weight, module.bias
    n_w = weight[0].numel()
    weight.grad.copy_(d[:, :n_w].reshape(weight.shape))
    if bias is not None and bias.grad is not None:
        bias.grad.copy_(d[:, n_w])


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _eager(function: Any) -> Any:
    """``function`` run eagerly when called from a compiled graph (a graph break there:
    it touches autograd nodes and Python counters, which dynamo cannot trace)."""
    compiler = getattr(torch, "compiler", None)
    return compiler.disable(function) if compiler is not None else function


class _ForwardHook:
    """The forward hook on one layer: a module-level class, not a closure, so that
    ``copy.deepcopy([model, optimizer])`` points the copied model's hooks at the copied
    :class:`LayerCapture`. While recording it puts a :class:`_GradHook` on the output's
    autograd node (a pre-hook: what ``output.register_hook`` does, without its Python
    bookkeeping); under ``no_grad`` the output does not require grad and nothing is
    recorded."""

    def __init__(self, capture: LayerCapture, name: str):
        self.capture, self.name = capture, name

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        # Under torch.compile only this flag is read in the traced graph (one guard: a
        # graph that records and one that does not); recording runs eagerly.
        if not self.capture._active:
            return
        if _compiling():
            self.capture.persistent = True
        self._record(module, inputs, output)

    @_eager
    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        hook = _GradHook(self.capture, self.name, module, inputs[0].detach(), output.output_nr,
                         self.capture.passes)
        node = output.grad_fn
        if node is None:  # a leaf (a forward hook of the user's returned one)
            output.register_hook(lambda grad: hook((grad,)))
        else:
            node.register_prehook(hook)


class _GradHook:
    """Records the call's input and output gradient together, only when the output is
    back-propagated (a forward without backward leaves no trace), in the parameters'
    dtype (autocast may have run the layer in half precision; otherwise no copy: the
    rows are formed in the optimizer's step)."""

    __slots__ = ("capture", "name", "module", "x", "index", "forward_pass")

    def __init__(self, capture: LayerCapture, name: str, module: nn.Module, x: torch.Tensor,
                 index: int = 0, forward_pass: int = 0):
        self.capture, self.name, self.module, self.x, self.index = (capture, name, module, x,
                                                                    index)
        self.forward_pass = forward_pass

    def __call__(self, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        grad = grad_outputs[self.index]
        if grad is None:
            return
        capture, name, x = self.capture, self.name, self.x
        dtype = self.module.weight.dtype
        inputs = capture.inputs.get(name)
        if inputs is None:
            inputs = capture.inputs[name] = []
            capture.grads[name] = []
            capture.batches[name] = {}
        inputs.append(x if x.dtype == dtype else x.to(dtype))
        capture.grads[name].append(grad.detach() if grad.dtype == dtype else
                                   grad.detach().to(dtype))
        # A convolution's samples: the batch of one call per forward pass of the model (a
        # layer applied twice in one pass sees the same images twice)
        capture.batches[name][self.forward_pass] = x.shape[0]


class _PassCounter:
    """The model's forward pre-hook while recording: numbers its forward passes, so that
    a layer's calls are grouped by the pass they belong to (module-level for deepcopy)."""

    def __init__(self, capture: LayerCapture):
        self.capture = capture

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if self.capture._active:
            self._count()

    @_eager
    def _count(self) -> None:
        self.capture.passes += 1
