"""What makes hpcqn's torch optimizers behave as ``torch.optim`` optimizers do where torch's
own test suite checks it: a ``state_dict`` of tensors and plain values only, shaped
``{"state", "param_groups"}`` (hpcqn's own curvature state nested under ``"state"``), the
state-dict hooks, ``copy.deepcopy``, and stepping a wrapped first-order optimizer without
firing the global step hooks twice.

hpcqn's part of a ``state_dict`` lives at ``state_dict["state"][0]["hpcqn"]`` (the first
parameter's entry: every ``state`` key stays an integer, so the project's HDF5
checkpoints, which need all-integer or all-string keys, and their per-rank merge, which
merges dicts key by key, keep working). Its arrays are torch tensors (host, the dtype
unchanged), so ``torch.load`` with its default ``weights_only=True`` reads it.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .. import backend

OURS = "hpcqn"  # the key, in state["state"][0], of hpcqn's own state


class StateDict(dict):
    """A torch-shaped state dict (its keys are exactly ``"state"`` and ``"param_groups"``)
    that still answers the keys of hpcqn's earlier layout, read-only: ``sd["hpcqn"]`` (the
    nested hpcqn state, arrays as NumPy) and, for MKOR/K-FAC, ``sd["inner"]`` (the
    first-order optimizer's own state dict). ``in``, ``keys()`` and iteration see only the
    two torch keys."""

    def __missing__(self, key: Any) -> Any:
        state = dict.get(self, "state")
        if key == OURS and isinstance(state, Mapping) and isinstance(state.get(0), Mapping) \
                and OURS in state[0]:
            return to_numpy(state[0][OURS])
        if key == "inner" and isinstance(state, Mapping):
            inner, _ = split_ours(state)
            return {"state": inner, "param_groups": dict.get(self, "param_groups")}
        raise KeyError(key)

    def __deepcopy__(self, memo: dict[int, Any]) -> StateDict:
        new = StateDict()
        memo[id(self)] = new
        for k, v in self.items():
            new[copy.deepcopy(k, memo)] = copy.deepcopy(v, memo)
        return new

    def __reduce__(self) -> Any:
        """Pickled (``torch.save``) as a ``collections.OrderedDict``, which
        ``torch.load(weights_only=True)`` reads without hpcqn being imported."""
        return (OrderedDict, (), None, None, iter(dict.items(self)))


def to_torch(tree: Any) -> Any:
    """NumPy arrays (anywhere in dicts, lists, tuples) as host torch tensors of the same
    dtype and bits (CuPy arrays as device tensors); other values as they are."""
    if isinstance(tree, np.ndarray):
        array = tree if tree.flags.c_contiguous and tree.flags.writeable else np.array(
            tree, order="C")
        return torch.from_numpy(array)
    if isinstance(tree, np.generic):
        return torch.from_numpy(np.array(tree))
    if backend.is_cupy_array(tree):  # a device copy (the core exports copies): zero-copy
        return torch.from_dlpack(tree)
    if isinstance(tree, dict):
        return {k: to_torch(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_torch(v) for v in tree)
    return tree


def to_numpy(tree: Any) -> Any:
    """The inverse of :func:`to_torch`: tensors become NumPy arrays (copies, same dtype)."""
    if isinstance(tree, torch.Tensor):
        return np.array(tree.detach().cpu().numpy(), copy=True)
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return tree


def split_ours(state: Mapping[Any, Any]) -> tuple[dict[Any, Any], Any]:
    """``state`` without hpcqn's entry, and that entry (None when absent)."""
    state = dict(state)
    first = state.get(0)
    ours = None
    if isinstance(first, Mapping) and OURS in first:
        first = dict(first)
        ours = first.pop(OURS)
        if first:
            state[0] = first
        else:
            del state[0]
    return state, ours


def pack(opt: torch.optim.Optimizer, ours: Any,
         base: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
         ) -> StateDict:
    """``opt``'s torch-shaped state dict with ``ours`` nested in it, running ``opt``'s
    state-dict pre and post hooks as ``torch.optim.Optimizer.state_dict`` does. ``base``:
    a torch state dict to start from (a wrapped optimizer's), or a function returning
    one, called after the pre hooks (so that what they put in ``opt.state`` is in it);
    else ``opt.state`` and ``opt.param_groups`` are packed the way torch packs them
    (parameters numbered by position over the groups, a repeated parameter keeping its
    first number; state under a key that is not a parameter kept under that key)."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    if callable(base):
        base = base()
    if base is None:
        index: dict[int, int] = {}
        groups = []
        start = 0
        for group in opt.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for i, p in enumerate(group["params"], start):
                index.setdefault(id(p), i)
            packed["params"] = [index[id(p)] for p in group["params"]]
            start += len(group["params"])
            groups.append(packed)
        state = {(index[id(k)] if isinstance(k, torch.Tensor) else k): v
                 for k, v in opt.state.items()
                 if not isinstance(k, torch.Tensor) or id(k) in index}
    else:
        groups = list(base["param_groups"])
        state = dict(base["state"])
    first = dict(state.get(0, {}))  # a copy: opt.state's own entry stays as it is
    first[OURS] = to_torch(ours)
    state = {0: first, **{k: v for k, v in state.items() if k != 0}}
    result: Any = {"state": state, "param_groups": groups}
    for hook in opt._optimizer_state_dict_post_hooks.values():
        out = hook(opt, result)
        if out is not None:
            result = out
    return StateDict(result)


def unpack(opt: torch.optim.Optimizer, state_dict: Mapping[str, Any], what: str,
           legacy_torch_key: str | None = None) -> tuple[dict[str, Any], Any]:
    """Run ``opt``'s load-state-dict pre hooks on ``state_dict`` and split it into the torch
    part (``{"state", "param_groups"}``) and hpcqn's part (arrays as NumPy). Reads both this
    layout and the earlier one (hpcqn's part at the top level, under ``"hpcqn"``, the torch
    part at the top level or under ``legacy_torch_key``). ``ValueError`` naming ``what``
    when hpcqn's part is missing."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"not an {what} state_dict (got {type(state_dict).__name__})")
    state_dict = dict(state_dict)  # shallow, as torch does
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        out = hook(opt, state_dict)
        if out is not None:
            state_dict = out
    if OURS in state_dict:  # the earlier layout
        ours = state_dict[OURS]
        if legacy_torch_key is not None:
            torch_part = state_dict.get(legacy_torch_key)
        else:
            torch_part = {k: v for k, v in state_dict.items() if k != OURS}
    else:
        if not isinstance(state_dict.get("state"), Mapping):
            raise ValueError(f"not an {what} state_dict")
        inner, ours = split_ours(state_dict["state"])
        torch_part = {"state": inner, "param_groups": state_dict.get("param_groups")}
    if ours is None or not isinstance(torch_part, Mapping):
        raise ValueError(f"not an {what} state_dict (no hpcqn state in it)")
    return dict(torch_part), to_numpy(ours)


def call_closure(closure: Any, what: str) -> Any:
    """torch's closure contract: called under ``torch.enable_grad()`` (``step`` runs
    under ``no_grad``); it computes the loss and calls ``backward()``; whatever it returns
    is what ``step`` returns (``torch.optim.Optimizer.step``: the loss, a tensor or a
    float, or anything else). ``what``: the optimizer's name, for the ``TypeError`` when
    ``closure`` is not callable."""
    if not callable(closure):
        raise TypeError(f"{what}.step(closure): closure must be callable (it computes the "
                        f"loss and calls backward()), got {type(closure).__name__}")
    with torch.enable_grad():
        return closure()


def learning_rate(lr: Any, what: str) -> Any:
    """``lr`` as an option check sees it: a one-element tensor (torch takes a tensor
    ``lr``; it stays one in the param groups) as its float, anything else as it is.
    ``ValueError`` for a tensor of several elements, as ``torch.optim``."""
    if not isinstance(lr, torch.Tensor):
        return lr
    if lr.numel() != 1:
        raise ValueError(f"{what}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    return float(lr)


def run_load_post_hooks(opt: torch.optim.Optimizer) -> None:
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def load_torch_part(opt: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """What ``torch.optim.Optimizer.load_state_dict`` does with the torch part, without
    running the hooks again: the groups' options from ``saved`` (each group keeps its
    ``param_names`` when ``saved`` has none), and the per-parameter state, copied, its
    tensors (but ``"step"``) moved to the parameter's device and floating dtype; state
    under a key that is not a parameter number is kept under that key."""
    groups = opt.param_groups
    saved_groups = copy.deepcopy(saved.get("param_groups"))
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups,
                                                                 strict=True)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match "
                         "the size of optimizer's group")
    id_map = {i: p for g, s in zip(groups, saved_groups, strict=True)
              for i, p in zip(s["params"], g["params"], strict=True)}
    state: defaultdict[Any, Any] = defaultdict(dict)
    for k, v in saved.get("state", {}).items():
        if k in id_map:
            state[id_map[k]] = _cast(id_map[k], copy.deepcopy(v))
        else:
            state[k] = copy.deepcopy(v)
    new_groups = []
    for g, s in zip(groups, saved_groups, strict=True):
        s["params"] = g["params"]
        if "param_names" in g and "param_names" not in s:
            s["param_names"] = g["param_names"]
        new_groups.append(s)
    opt.state = state
    opt.param_groups = new_groups


def _cast(param: torch.Tensor, value: Any, key: Any = None) -> Any:
    """``value`` with its tensors on ``param``'s device (and, for a floating ``param``,
    in its dtype), except a ``"step"`` count, as torch loads per-parameter state."""
    if isinstance(value, torch.Tensor):
        if key == "step":
            return value
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device)
        return value.to(device=param.device)
    if isinstance(value, dict):
        return {k: _cast(param, v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(param, v) for v in value)
    return value


def step_without_global_hooks(opt: torch.optim.Optimizer, closure: Any = None) -> Any:
    """``opt.step()`` for an optimizer wrapped by another one: its own step hooks run, the
    global ones (``torch.optim.optimizer.register_optimizer_step_pre_hook``/``post_hook``)
    do not, since the wrapping optimizer's step already fires them once."""
    method = type(opt).step
    plain = getattr(method, "__wrapped__", None)
    if plain is None or not getattr(method, "hooked", False) or "step" in vars(opt):
        return opt.step() if closure is None else opt.step(closure)
    args: tuple[Any, ...] = (opt,) if closure is None else (opt, closure)
    for hook in opt._optimizer_step_pre_hooks.values():
        hook(opt, args[1:], {})
    out = plain(*args)
    opt._optimizer_step_code()
    for hook in opt._optimizer_step_post_hooks.values():
        hook(opt, args[1:], {})
    return out


def shared_on_copy(root: Any) -> list[Any]:
    """What a deepcopy must share, not copy: the communicators and the modules (array
    namespaces) reachable from ``root`` through dicts, lists, tuples, sets and attributes
    (tensors, arrays and torch modules are not entered)."""
    from ..comm import Communicator

    found: list[Any] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, (Communicator, types.ModuleType)):
            found.append(obj)
        elif isinstance(obj, (torch.Tensor, np.ndarray, torch.nn.Module)):
            continue
        elif isinstance(obj, Mapping):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            todo.extend(vars(obj).values())
        elif hasattr(type(obj), "__slots__"):
            todo.extend(getattr(obj, name) for name in type(obj).__slots__
                        if isinstance(name, str) and hasattr(obj, name))
    return found


class CopyableOptimizer:
    """``copy.deepcopy`` keeps every attribute (torch's ``Optimizer.__getstate__`` keeps
    only ``defaults``, ``state`` and ``param_groups``) and shares the communicator and the
    array module; pickling raises ``TypeError`` naming the alternative (a communicator
    cannot travel to another process)."""

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Any:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)  # shallow, as copy.copy of a torch optimizer
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        for obj in shared_on_copy(vars(self)):
            memo.setdefault(id(obj), obj)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        name = f"hpcqn.torch.{type(self).__name__}"
        raise TypeError(f"{name} cannot be pickled (it holds an MPI communicator and array "
                        f"modules): save opt.state_dict() (torch.save works) and load it "
                        f"into a new {name} with load_state_dict; copy.deepcopy([model, opt]) "
                        f"copies both within one process")
