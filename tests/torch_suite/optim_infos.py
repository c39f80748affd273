"""``OptimizerInfo`` entries for :class:`hpcqn.torch.MLBFGS` and :class:`hpcqn.torch.LAMB`,
in the form of torch's ``optim_db`` (``torch.testing._internal.common_optimizers``):
sample option sets (``optim_inputs_func``: never a global flag such as ``foreach``), the
inputs that must fail and how (``optim_error_inputs_func``: torch's inputs for every
optimizer plus each optimizer's own), and a skip, with its reason, for each generic test
whose convention cannot hold for that optimizer. The reasons are collected in
docs/torch_known_differences.md.

``MLBFGS`` is built without ``comm``: the world communicator, one rank in a serial run.
"""

from __future__ import annotations

import unittest

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import hpcqn.torch as ht

GENERIC = "TestOptimRenewed"  # the class name torch's skips refer to

# Flags that some torch.optim optimizers take and these do not: refused as unknown
# options (a TypeError naming the flag), as Python refuses an unexpected keyword.
UNSUPPORTED_FLAGS = ("foreach", "fused", "differentiable", "capturable", "maximize")

ONE_GROUP = ("hpcqn.torch.MLBFGS takes one parameter group: its core steps every block "
             "with one lr and one weight_decay (per-group options: hpcqn.torch.MKOR or "
             "hpcqn.torch.KFAC with a torch.optim optimizer built over the groups)")
# torch's test_complex_2d: tests/test_torch_suite.py does not write it, as the only entry
# that takes complex parameters skips it (docs/torch_known_differences.md).
PER_TENSOR_TRUST_RATIO = ("LAMB scales each tensor's step by its own trust ratio "
                          "||p|| / ||r||: a complex tensor split into its real and "
                          "imaginary parts as two tensors gets two ratios, so the steps "
                          "differ by design (test_complex, one tensor viewed as real, "
                          "holds bitwise)")

SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
    # peaking at the option set's own lr, and cycling the momentum (MLBFGS's group
    # "momentum", LAMB's betas[0])
    [lambda opt: OneCycleLR(opt, max_lr=float(opt.param_groups[0]["lr"]), total_steps=40)],
    [lambda opt: LinearLR(opt, start_factor=0.5, total_iters=4),
     lambda opt: ExponentialLR(opt, gamma=0.95)],
)


def mlbfgs_inputs(device: str, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """Option sets: the defaults (no curvature pair before step 20), a smaller and a
    tensor lr, weight decay, and short periods so that curvature pairs enter within the
    generic tests' 3 to 20 steps, with and without the direction's momentum and
    normalisation."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.02}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.02)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"history": 3, "period": 2},
                       desc="curvature pairs every 2 steps"),
        OptimizerInput(params=None, kwargs={"period": 3, "direction_momentum": 0.0,
                                            "min_cos": 0.0, "pair_damping": 0.1},
                       desc="no direction momentum, every pair kept"),
        OptimizerInput(params=None, kwargs={"period": 2, "normalize_direction": False,
                                            "momentum_form": "sum", "lr": 0.01},
                       desc="unnormalised sums"),
    ]


def lamb_inputs(device: str, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"betas": (0.8, 0.99), "eps": 1e-8},
                       desc="betas and eps"),
    ]


def _graded(shape: tuple[int, ...], device: str, dtype: torch.dtype) -> Parameter:
    p = Parameter(torch.randn(shape, device=device, dtype=dtype))
    p.grad = torch.randn_like(p)
    return p


def _unsupported_flags(cls: type, device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    return [ErrorOptimizerInput(
        OptimizerInput(params=[_graded((2, 3), device, dtype)], kwargs={flag: True},
                       desc=f"{flag} is not an option of {cls.__name__}"),
        error_type=TypeError, error_regex=flag) for flag in UNSUPPORTED_FLAGS]


def _sparse_gradient(cls: type, device: str, dtype: torch.dtype) -> ErrorOptimizerInput:
    p = Parameter(torch.randn(4, 3, device=device, dtype=dtype))
    p.grad = torch.randn(4, 3, device=device, dtype=dtype).to_sparse()
    return ErrorOptimizerInput(
        OptimizerInput(params=[p], kwargs={}, desc="sparse gradients"),
        error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
        error_regex=f"{cls.__name__} does not support sparse gradients")


def mlbfgs_error_inputs(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    errors = get_error_inputs_for_all_optims(device, dtype)
    complex_param = Parameter(torch.randn(3, 2, device=device, dtype=torch.complex64))
    half = Parameter(torch.randn(3, 2, device=device, dtype=torch.float16))
    other = Parameter(torch.randn(3, device=device, dtype=torch.float64))
    errors += [
        ErrorOptimizerInput(
            OptimizerInput(params=[complex_param], kwargs={}, desc="complex parameters"),
            error_type=TypeError,
            error_regex="does not support complex parameters"),
        ErrorOptimizerInput(
            OptimizerInput(params=[half], kwargs={}, desc="half precision"),
            error_type=TypeError, error_regex=r"model\.float\(\).*torch\.autocast"),
        ErrorOptimizerInput(
            OptimizerInput(params=[_graded((3, 2), device, dtype), other], kwargs={},
                           desc="several dtypes"),
            error_type=TypeError, error_regex=r"several dtypes.*model\.to\(dtype\)"),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [_graded((3, 2), device, dtype)]},
                                   {"params": [_graded((3,), device, dtype)], "lr": 0.01}],
                           kwargs={}, desc="two parameter groups"),
            error_type=ValueError, error_regex="takes one parameter group"),
        ErrorOptimizerInput(
            OptimizerInput(params=[_graded((3, 2), device, dtype)], kwargs={"lr": -0.1},
                           desc="negative lr"),
            error_type=ValueError, error_regex="option lr must be"),
        ErrorOptimizerInput(
            OptimizerInput(params=[_graded((3, 2), device, dtype)], kwargs={"history": 0},
                           desc="no history"),
            error_type=ValueError, error_regex="option history must be"),
        ErrorOptimizerInput(
            OptimizerInput(params=[_graded((3, 2), device, dtype)], kwargs={"blocks": [2]},
                           desc="blocks that do not add up"),
            error_type=ValueError, error_regex="blocks"),
        _sparse_gradient(ht.MLBFGS, device, dtype),
    ]
    return errors + _unsupported_flags(ht.MLBFGS, device, dtype)


def lamb_error_inputs(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    errors = get_error_inputs_for_all_optims(device, dtype)
    for kwargs, name in (({"lr": -1e-3}, "lr"), ({"betas": (1.0, 0.999)}, "betas"),
                         ({"eps": 0.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay")):
        errors.append(ErrorOptimizerInput(
            OptimizerInput(params=[_graded((3, 2), device, dtype)], kwargs=kwargs,
                           desc=f"bad {name}"),
            error_type=ValueError, error_regex=f"option {name} must be"))
    errors.append(_sparse_gradient(ht.LAMB, device, dtype))
    return errors + _unsupported_flags(ht.LAMB, device, dtype)


hpcqn_optim_db: list[OptimizerInfo] = [
    OptimizerInfo(
        ht.MLBFGS,
        optim_inputs_func=mlbfgs_inputs,
        optim_error_inputs_func=mlbfgs_error_inputs,
        scheduler_inputs=SCHEDULERS,
        supported_impls=(),
        # State dicts written before the group held the direction momentum lack it.
        not_og_supported_flags=("momentum",),
        supports_complex=False,
        supports_param_groups=False,
        supports_multiple_devices=False,
        skips=tuple(
            DecorateInfo(unittest.skip(ONE_GROUP), GENERIC, name)
            for name in ("test_param_groups_lr", "test_param_groups_weight_decay",
                         "test_param_group_with_lrscheduler_goes_right_direction")),
    ),
    OptimizerInfo(
        ht.LAMB,
        optim_inputs_func=lamb_inputs,
        optim_error_inputs_func=lamb_error_inputs,
        scheduler_inputs=SCHEDULERS,
        supported_impls=(),
        not_og_supported_flags=(),
        skips=(DecorateInfo(unittest.skip(PER_TENSOR_TRUST_RATIO), GENERIC, "test_complex_2d"),),
    ),
]
