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


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


class LayerCapture:
    """Hooks on every supported layer of ``model`` not named by ``skip_layers`` (exact
    module names or regular expressions matched against the whole name)."""

    def __init__(self, model: nn.Module, skip_layers: Iterable[str] = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(skip_layers, str):
            skip_layers = [skip_layers]
        patterns = list(skip_layers)
        for p in patterns:
            re.compile(p)  # a bad pattern fails here, with re's message
        self.layers: list[tuple[str, nn.Module]] = []
        self.skipped: list[str] = []
        self.unsupported: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, SUPPORTED):
                continue
            if _skipped(name, patterns):
                self.skipped.append(name)
            elif isinstance(module, nn.Conv2d) and (module.groups != 1
                                                    or module.padding_mode != "zeros"
                                                    or isinstance(module.padding, str)):
                # grouped, non-zero-padded and "same"/"valid"-padded convolutions
                self.unsupported.append(name)
            else:
                self.layers.append((name, module))
        if not self.layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition "
                             f"(skipped: {self.skipped}, unsupported: {self.unsupported})")
        self.modules = dict(self.layers)
        # Per layer, one entry per call that was back-propagated: the input and the
        # gradient of the output, as tensors (no rows formed yet).
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.batch: dict[str, int] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._active = False
        self._removed = False

    @property
    def active(self) -> bool:
        """Whether the hooks record; setting it registers or removes the forward hooks (a
        module with no hook takes torch's fast call path)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)
        if self._active and not self._handles and not self._removed:
            self._handles = [m.register_forward_hook(self._forward_hook(n))
                             for n, m in self.layers]
        elif not self._active and self._handles:
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
        self.inputs, self.batch, self.grads = {}, {}, {}

    def remove(self) -> None:
        """Remove the hooks for good."""
        self.active = False
        self._removed = True

    def _forward_hook(self, name: str) -> Any:
        return _ForwardHook(self, name)

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``(input rows, output-gradient rows, batch size)`` recorded for a layer since
        the last :meth:`clear`, or None when its hooks did not both fire."""
        if name not in self.inputs or name not in self.grads:
            return None
        module = self.modules[name]
        a = [input_rows(module, x) for x in self.inputs[name]]
        g = [output_grad_rows(module, grad) for grad in self.grads[name]]
        return (torch.cat(a) if len(a) > 1 else a[0], torch.cat(g) if len(g) > 1 else g[0],
                self.batch[name])

    def second_moments(self, name: str, grad_scale: float = 1.0
                       ) -> tuple[torch.Tensor, int, torch.Tensor, int] | None:
        """``(sum a a^T, rows, sum g g^T, batch size)`` over the rows :meth:`rows` would
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
        return a_sum, count, g_sum, self.batch[name]


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
        if not self.capture.active or not output.requires_grad:
            return
        hook = _GradHook(self.capture, self.name, module, inputs[0].detach(), output.output_nr)
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

    __slots__ = ("capture", "name", "module", "x", "index")

    def __init__(self, capture: LayerCapture, name: str, module: nn.Module, x: torch.Tensor,
                 index: int = 0):
        self.capture, self.name, self.module, self.x, self.index = (capture, name, module, x,
                                                                    index)

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
        inputs.append(x if x.dtype == dtype else x.to(dtype))
        capture.grads[name].append(grad.detach() if grad.dtype == dtype else
                                   grad.detach().to(dtype))
        # The batch size of one call: a layer applied T times to (B, d) has the same
        # statistics as one call on (B, T, d).
        capture.batch[name] = x.shape[0]
