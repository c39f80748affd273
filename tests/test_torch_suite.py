"""torch's generic optimizer tests (``TestOptimRenewed`` of torch's test/test_optim.py,
which the wheel does not ship), written again over the infrastructure the wheel does ship
(``OptimizerInfo``, the ``optims`` decorator, ``instantiate_device_type_tests``) and run
on hpcqn's entries (tests/torch_suite/optim_infos.py: ``MLBFGS``, ``LAMB``); then the
same conventions for ``MKOR`` and ``KFAC``, which take a model rather than parameters,
through their public API.

Each test of the first part has the name of torch's test whose check it makes (on the
CPU; torch's CUDA-only and foreach/fused tests are not applied: the list, with reasons,
is docs/torch_known_differences.md, as are the skips the entries declare).
``test_step_returns_what_the_closure_returns`` is hpcqn's own addition.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest

torch = pytest.importorskip("torch")

from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch_suite import (  # noqa: E402
    OptimizerErrorEnum,
    TestCase,
    instantiate_device_type_tests,
    onlyCPU,
    optims,
    parametrize,
)
from torch_suite.optim_infos import hpcqn_optim_db  # noqa: E402

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402

GLOBAL_CLIQUEY = {"foreach", "fused", "differentiable"}


def quadratic(weight, bias, inpt):
    """torch's test objective: ``||W x + b||^2``."""
    return (weight.mv(inpt) + bias).pow(2).sum()


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss.detach())
        else:
            scheduler.step()


def recorder(log, label):
    """A step or state-dict hook that appends ``label`` to ``log``."""

    def hook(*args):
        log.append(label)

    return hook


def public_attributes(obj):
    return {k for k in vars(obj) if not k.startswith("_")}


def named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else list(params)


def without_param_names(state_dict):
    out = copy.deepcopy(dict(state_dict))
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


def conv_bn_model(device, dtype):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                               torch.nn.BatchNorm2d(2)).to(device=device, dtype=dtype)


# torch's state-dict hooks: a pre hook adding to ``optimizer.state``, a post hook that
# removes it and records that it saw it, two load pre hooks (one changes the given state
# dict in place, the other returns a changed copy) and a load post hook that records.
def state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
    return state_dict


def load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def load_state_dict_pre_hook2(optimizer, state_dict):
    changed = copy.deepcopy(state_dict)
    changed["param_groups"][0]["lr"] = 0.003
    return changed


def load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


class TestOptimRenewed(TestCase):
    """The checks of torch's ``TestOptimRenewed`` that apply to a single-process
    optimizer on the CPU, for every entry of ``hpcqn_optim_db``."""

    @onlyCPU
    @optims(hpcqn_optim_db)
    def test_optim_infos_do_not_specify_global_cliquey_kwargs(self, device, dtype,
                                                               optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            self.assertFalse(GLOBAL_CLIQUEY & set(optim_input.kwargs), optim_input.desc)

    @optims(hpcqn_optim_db)
    def test_errors(self, device, dtype, optim_info):
        cls = optim_info.optim_cls
        for error_input in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            given = error_input.optimizer_error_input
            if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
                call = functools.partial(cls, given.params, **given.kwargs)
            else:
                call = cls(given.params, **given.kwargs).step
            if issubclass(error_input.error_type, Warning):
                with self.assertWarnsRegex(error_input.error_type, error_input.error_regex,
                                           msg=given.desc):
                    call()
            else:
                with self.assertRaisesRegex(error_input.error_type, error_input.error_regex,
                                            msg=given.desc):
                    call()

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info, contiguous,
                                          with_lrsched):
        """20 steps on ``||W x + b||^2`` lower it, for every option set, with and without
        each set of schedulers, with contiguous and strided parameters."""
        for make_schedulers in optim_info.scheduler_inputs if with_lrsched else [()]:
            # fresh inputs per scheduler set: a scheduler changes a tensor lr in place
            for optim_input in optim_info.optim_inputs_func(device=device):
                if contiguous:
                    weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
                    bias = Parameter(torch.randn(10, device=device, dtype=dtype))
                else:
                    weight = Parameter(torch.randn(10, 5, 2, device=device,
                                                   dtype=dtype)[..., 0])
                    bias = Parameter(torch.randn(10, 2, device=device, dtype=dtype)[..., 0])
                    self.assertFalse(weight.is_contiguous())
                inpt = torch.randn(5, device=device, dtype=dtype)
                optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
                schedulers = [make(optimizer) for make in make_schedulers]

                def closure(optimizer=optimizer, weight=weight, bias=bias, inpt=inpt):
                    optimizer.zero_grad()
                    loss = quadratic(weight, bias, inpt)
                    loss.backward()
                    return loss

                initial = closure().item()
                for _ in range(20):
                    loss = closure()
                    optimizer.step()
                    step_schedulers(schedulers, loss)
                self.assertLess(closure().item(), initial, optim_input.desc)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype,
                                                               optim_info):
        for make_schedulers in optim_info.scheduler_inputs:
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            inpt = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls([{"params": [weight]},
                                              {"params": [bias], "lr": 0.01}])
            schedulers = [make(optimizer) for make in make_schedulers]

            def closure(optimizer=optimizer, weight=weight, bias=bias, inpt=inpt):
                optimizer.zero_grad()
                loss = quadratic(weight, bias, inpt)
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                step_schedulers(schedulers, loss)
            self.assertLess(closure().item(), initial)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_tensor_lr(self, device, dtype, optim_info):
        """A 0-d tensor lr steps exactly as its value as a float."""
        for optim_input in optim_info.optim_inputs_func(device=device):
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            weight_c = weight.detach().clone().requires_grad_(True)
            bias_c = bias.detach().clone().requires_grad_(True)
            inpt = torch.randn(5, device=device, dtype=dtype)
            kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
            lr = torch.tensor(1e-3)
            with_float = optim_info.optim_cls([weight, bias], lr=float(lr), **kwargs)
            with_tensor = optim_info.optim_cls([weight_c, bias_c], lr=lr, **kwargs)
            for _ in range(5):
                for optimizer, w, b in ((with_float, weight, bias),
                                        (with_tensor, weight_c, bias_c)):
                    optimizer.zero_grad()
                    quadratic(w, b, inpt).backward()
                    optimizer.step()
                self.assertEqual(weight, weight_c, atol=0, rtol=0)
                self.assertEqual(bias, bias_c, atol=0, rtol=0)

    @optims([o for o in hpcqn_optim_db if o.supports_complex], dtypes=[torch.complex64])
    def test_complex(self, device, dtype, optim_info):
        """Complex parameters (and a real one beside them) step exactly as their
        ``view_as_real`` copies do."""
        for optim_input in optim_info.optim_inputs_func(device=device):
            complex_params = [
                torch.randn(10, 5, device=device, dtype=dtype, requires_grad=True),
                torch.randn(10, device=device, dtype=dtype, requires_grad=True),
                torch.randn(10, 5, device=device, dtype=torch.float32, requires_grad=True),
            ]
            real_params = [(torch.view_as_real(p) if p.is_complex() else p)
                           .detach().clone().requires_grad_() for p in complex_params]
            complex_optimizer = optim_info.optim_cls(complex_params, **optim_input.kwargs)
            real_optimizer = optim_info.optim_cls(real_params, **optim_input.kwargs)
            for _ in range(3):
                for p, r in zip(complex_params, real_params, strict=True):
                    r.grad = torch.randn_like(r)
                    p.grad = torch.view_as_complex(r.grad.clone()) if p.is_complex() else \
                        r.grad.clone()
                real_optimizer.step()
                complex_optimizer.step()
                as_real = [torch.view_as_real(p) if p.is_complex() else p
                           for p in complex_params]
                self.assertEqual(as_real, real_params, atol=0, rtol=0)

    @optims(hpcqn_optim_db)
    def test_mixed_device_dtype(self, device, dtype, optim_info):
        """Parameters of float64, float32, float16 and bfloat16 (and an int64 one without
        gradient) in one optimizer: torch's per-tensor optimizers step each as they would
        alone; an optimizer over one flat vector refuses them, naming the fix. (torch's
        test also spreads them over two GPUs: not on the CPU.)"""
        dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        params = [torch.rand(2, 3, dtype=d, device=device, requires_grad=True)
                  for d in dtypes]
        params.append(torch.randint(1024, (2, 3), device=device))
        for p in params[:-1]:
            p.grad = torch.rand_like(p)
        for optim_input in optim_info.optim_inputs_func(device=device):
            kwargs = optim_input.kwargs
            if not optim_info.supports_multiple_devices:  # one flat vector, one dtype
                with self.assertRaisesRegex(TypeError, r"several dtypes.*model\.to\(dtype\)"):
                    optim_info.optim_cls(params, **kwargs)
                continue
            together = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
            alone = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
            for copies in (together, alone):
                for p, q in zip(params[:-1], copies[:-1], strict=True):
                    q.grad = p.grad.clone()
            optimizer = optim_info.optim_cls(together, **kwargs)
            singles = [optim_info.optim_cls([p], **kwargs) for p in alone]
            for _ in range(7):
                optimizer.step()
                for single in singles:
                    single.step()
            self.assertEqual(together, alone, atol=0, rtol=0)
            self.assertTrue(torch.equal(together[-1], params[-1]))

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            inpt = torch.randn(5, device=device, dtype=dtype)
            bias_kwargs = {**optim_input.kwargs, "weight_decay": 0.0}
            optimizer = optim_info.optim_cls([dict(params=[weight], **optim_input.kwargs),
                                              dict(params=[bias], **bias_kwargs)])
            initial = quadratic(weight, bias, inpt).item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = quadratic(weight, bias, inpt)
                loss.backward()
                optimizer.step()
            self.assertLess(loss.item(), initial, optim_input.desc)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_param_groups_lr(self, device, dtype, optim_info):
        """A group with an lr of 1e-28 does not move; the other, with its own lr, lowers
        the loss."""
        for optim_input in optim_info.optim_inputs_func(device=device):
            kwargs = dict(optim_input.kwargs)
            kwargs.setdefault("lr", 1e-3)
            weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
            bias = Parameter(torch.randn(10, device=device, dtype=dtype))
            irrelevant = Parameter(torch.randn(2, device=device, dtype=dtype))
            irrelevant_clone = irrelevant.detach().clone()
            inpt = torch.randn(5, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls([dict(params=[weight, bias], **kwargs),
                                              dict(params=[irrelevant])], lr=1e-28)
            initial = quadratic(weight, bias, inpt).item()
            for _ in range(20):
                optimizer.zero_grad()
                loss = quadratic(weight, bias, inpt)
                loss.backward()
                irrelevant.grad = torch.rand_like(irrelevant)
                optimizer.step()
            self.assertLess(loss.item(), initial, optim_input.desc)
            self.assertEqual(irrelevant, irrelevant_clone, atol=0, rtol=0)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        """Parameters that do not require a gradient are accepted and never move."""
        params = [torch.randn(2, 3, device=device, dtype=dtype) for _ in range(2)]
        before = [p.clone() for p in params]
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            loss = optimizer.step(lambda: torch.tensor([1.0], device=device, dtype=dtype))
            self.assertEqual(loss, torch.tensor([1.0], device=device, dtype=dtype))
            self.assertEqual(params, before, atol=0, rtol=0)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        """Zero gradients (without weight decay) leave the parameter exactly as it was."""
        param = torch.randn(5, 1, device=device, dtype=dtype, requires_grad=True)
        before = param.detach().clone()
        for optim_input in optim_info.optim_inputs_func(device=device):
            if optim_input.kwargs.get("weight_decay", 0) != 0:
                continue  # weight decay moves parameters without any gradient
            optimizer = optim_info.optim_cls([param], **optim_input.kwargs)
            param.grad = torch.zeros_like(param)
            optimizer.step(lambda: torch.tensor([1.0], device=device, dtype=dtype))
            self.assertEqual(param, before, atol=0, rtol=0, msg=optim_input.desc)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for optim_input in optim_info.optim_inputs_func(device=device):
            text = repr(optim_info.optim_cls(params, **optim_input.kwargs))
            self.assertTrue(text.startswith(optim_info.name), text)
            self.assertIn("lr: ", text)

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info, is_named_optim0,
                                      is_named_optim1):
        """A state dict loaded into a new optimizer over equal (not the same) parameters
        continues identically, and the two state dicts stay equal (parameter names
        aside); a repeated group is packed as its first occurrence."""
        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        inpt = torch.randn(3, device=device, dtype=dtype)

        def fwd_bwd(optimizer, w, b):
            optimizer.zero_grad()
            loss = quadratic(w, b, inpt)
            loss.backward()
            return loss

        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(named([weight, bias], is_named_optim0),
                                             **optim_input.kwargs)
            for _ in range(10):
                fwd_bwd(optimizer, weight, bias)
                optimizer.step()
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            optimizer_c = optim_info.optim_cls(named([weight_c, bias_c], is_named_optim1),
                                               **optim_input.kwargs)
            optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            for _ in range(10):
                fwd_bwd(optimizer, weight, bias)
                fwd_bwd(optimizer_c, weight_c, bias_c)
                optimizer.step()
                optimizer_c.step()
                self.assertEqual(weight, weight_c, atol=0, rtol=0)
                self.assertEqual(bias, bias_c, atol=0, rtol=0)
            self.assertEqual(without_param_names(optimizer.state_dict()),
                             without_param_names(optimizer_c.state_dict()), atol=0, rtol=0)
            optimizer_c.param_groups.extend(optimizer_c.param_groups)
            self.assertEqual(without_param_names(optimizer.state_dict())["param_groups"][-1],
                             without_param_names(optimizer_c.state_dict())["param_groups"][-1])

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_can_load_older_state_dict(self, device, dtype, optim_info):
        """A state dict without the group options added since the first release loads,
        and the optimizer steps."""
        inpt = torch.rand(1, 4, 16, 16, device=device, dtype=dtype)
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = conv_bn_model(device, dtype)
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            for _ in range(3):
                optimizer.zero_grad()
                model(inpt).sum().backward()
                optimizer.step()
            older = copy.deepcopy(optimizer.state_dict())
            for group in older["param_groups"]:
                for flag in optim_info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(older)
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.zero_grad()
            model(inpt).sum().backward()
            optimizer.step()
            self.assertTrue(any(not torch.equal(a, p) for a, p in
                                zip(before, model.parameters(), strict=True)))

    @parametrize("is_named_optim0", [True, False])
    @parametrize("is_named_optim1", [True, False])
    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_can_load_from_to_named_state_dict(self, device, dtype, optim_info,
                                               is_named_optim0, is_named_optim1):
        """State dicts move between optimizers built from ``parameters()`` and from
        ``named_parameters()``; the names survive whenever either side had them."""
        inpt = torch.rand(1, 4, 16, 16, device=device, dtype=dtype)
        names = ["0.weight", "0.bias", "1.weight", "1.bias"]
        for optim_input in optim_info.optim_inputs_func(device=device):
            model = conv_bn_model(device, dtype)

            def fwd_bwd(optimizer, model=model):
                optimizer.zero_grad()
                model(inpt).sum().backward()

            first = optim_info.optim_cls(
                model.named_parameters() if is_named_optim0 else model.parameters(),
                **optim_input.kwargs)
            for _ in range(3):
                fwd_bwd(first)
                first.step()
            saved = copy.deepcopy(first.state_dict())
            second = optim_info.optim_cls(
                model.named_parameters() if is_named_optim1 else model.parameters(),
                **optim_input.kwargs)
            second.load_state_dict(saved)
            fwd_bwd(second)
            second.step()
            if is_named_optim0 or is_named_optim1:
                self.assertEqual(second.state_dict()["param_groups"][0]["param_names"], names)
            else:
                self.assertNotIn("param_names", second.state_dict()["param_groups"][0])

    @parametrize("is_named_optim", [True, False])
    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info,
                                                  is_named_optim):
        weight = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        bias = Parameter(torch.randn(2, device=device, dtype=dtype))
        inpt = torch.randn(3, device=device, dtype=dtype)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(named([weight, bias], is_named_optim),
                                             **optim_input.kwargs)

            def closure(optimizer=optimizer):
                optimizer.zero_grad()
                loss = quadratic(weight, bias, inpt)
                loss.backward()
                return loss

            for _ in range(3):
                optimizer.step(closure)
            saved = optimizer.state_dict()
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            for weights_only in (False, True):
                buffer.seek(0)
                self.assertEqual(torch.load(buffer, weights_only=weights_only), saved,
                                 atol=0, rtol=0)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_load_nontensor_step(self, device, dtype, optim_info):
        """A state dict whose tensor step counts became Python numbers loads and steps."""
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            state_dict = copy.deepcopy(optimizer.state_dict())
            steps = [s["step"] for s in state_dict["state"].values() if "step" in s]
            self.assertEqual(len(steps), len(params))
            for entry in state_dict["state"].values():
                if torch.is_tensor(entry.get("step")):
                    entry["step"] = entry["step"].item()
            optimizer.load_state_dict(state_dict)
            optimizer.step()
            self.assertTrue(all(float(optimizer.state[p]["step"]) == 4 for p in params))

    # -- state-dict hooks (torch's, as module functions below) ---------------------
    def _one_param_optimizers(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device=device):
            param = torch.rand(2, 3, device=device, dtype=dtype, requires_grad=True)
            yield optim_info.optim_cls([param], **optim_input.kwargs)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_state_dict_pre_hook(self, device, dtype, optim_info):
        """What a pre hook puts in ``optimizer.state`` is in the state dict."""
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
            self.assertEqual(optimizer.state_dict()["state"]["test"], 1)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_state_dict_post_hook(self, device, dtype, optim_info):
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            optimizer.register_state_dict_post_hook(state_dict_post_hook)
            self.assertFalse(optimizer.state_dict()["ran_state_dict_pre_hook"])

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
            optimizer.register_state_dict_post_hook(state_dict_post_hook)
            state_dict = optimizer.state_dict()
            self.assertNotIn("test", state_dict["state"])
            self.assertTrue(state_dict["ran_state_dict_pre_hook"])

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_load_state_dict_pre_hook_and_prepend(self, device, dtype, optim_info):
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            state_dict = optimizer.state_dict()
            optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook1)
            optimizer.load_state_dict(state_dict)
            self.assertEqual(optimizer.param_groups[0]["lr"], 0.002)
            # prepended, hook2's copy (lr 0.003) then goes through hook1 (lr 0.002)
            optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook2,
                                                        prepend=True)
            optimizer.load_state_dict(state_dict)
            self.assertEqual(optimizer.param_groups[0]["lr"], 0.002)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_load_state_dict_post_hook(self, device, dtype, optim_info):
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            optimizer.register_load_state_dict_post_hook(load_state_dict_post_hook)
            optimizer.load_state_dict(optimizer.state_dict())
            self.assertFalse(optimizer.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optimizer.state["ran_load_state_dict_post_hook"])

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_load_state_dict_pre_post_hook(self, device, dtype, optim_info):
        for optimizer in self._one_param_optimizers(device, dtype, optim_info):
            optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook2)
            optimizer.register_load_state_dict_post_hook(load_state_dict_post_hook)
            optimizer.load_state_dict(optimizer.state_dict())
            self.assertTrue(optimizer.state["ran_load_state_dict_pre_hook2"])
            self.assertTrue(optimizer.state["ran_load_state_dict_post_hook"])

    # -- step hooks -----------------------------------------------------------------
    def _hook_optimizers(self, device, dtype, optim_info):
        params = [torch.tensor([1.0, 1.0], device=device, dtype=dtype)]
        for optim_input in optim_info.optim_inputs_func(device=device):
            yield optim_info.optim_cls(params, **optim_input.kwargs)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_post_hook(self, device, dtype, optim_info):
        for optimizer in self._hook_optimizers(device, dtype, optim_info):
            calls = []
            handle = optimizer.register_step_post_hook(recorder(calls, optimizer))
            optimizer.step()
            optimizer.step()
            self.assertEqual(calls, [optimizer, optimizer])
            handle.remove()
            optimizer.step()
            self.assertEqual(len(calls), 2)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_pre_hook(self, device, dtype, optim_info):
        for optimizer in self._hook_optimizers(device, dtype, optim_info):
            calls = []
            handle = optimizer.register_step_pre_hook(recorder(calls, optimizer))
            optimizer.step()
            optimizer.step()
            self.assertEqual(len(calls), 2)
            handle.remove()
            optimizer.step()
            self.assertEqual(len(calls), 2)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_all_hooks(self, device, dtype, optim_info):
        """Global pre, own pre, own post, global post: in that order, once per step,
        beside a torch.optim.SGD doing the same."""
        for optimizer in self._hook_optimizers(device, dtype, optim_info):
            sgd = torch.optim.SGD(optimizer.param_groups[0]["params"])
            data = []
            handles = [register_optimizer_step_pre_hook(recorder(data, 0)),
                       register_optimizer_step_post_hook(recorder(data, 5))]
            try:
                for opt in (optimizer, sgd):
                    handles.append(opt.register_step_pre_hook(recorder(data, 1)))
                    handles.append(opt.register_step_post_hook(recorder(data, 2)))
                optimizer.step()
                self.assertEqual(data, [0, 1, 2, 5])
                sgd.step()
                optimizer.step()
                self.assertEqual(data, [0, 1, 2, 5] * 3)
            finally:
                for handle in handles:
                    handle.remove()
            optimizer.step()
            sgd.step()
            self.assertEqual(data, [0, 1, 2, 5] * 3)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                optimizer.step()
            self.assertEqual(public_attributes(optimizer),
                             public_attributes(copy.deepcopy(optimizer)))

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_non_empty_state(self, device, dtype, optim_info):
        model = torch.nn.Linear(5, 5).to(device=device, dtype=dtype)
        inpt = torch.rand(2, 5, device=device, dtype=dtype)
        for optim_input in optim_info.optim_inputs_func(device=device):
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
            optimizer.zero_grad()
            model(inpt).sum().backward()
            optimizer.step()
            self.assertEqual(len(optimizer.state), 2)
            for state in optimizer.state.values():
                self.assertGreater(len(state), 0)

    @optims(hpcqn_optim_db, dtypes=[torch.float32])
    def test_step_returns_what_the_closure_returns(self, device, dtype, optim_info):
        """``step(closure)`` returns the closure's result, whatever it is (a tensor, a
        Python number, None), as torch.optim.SGD does, and steps as without a closure."""
        for result in (torch.tensor(2.5), 2.5, 3, None):
            runs = []
            for with_closure in (False, True):
                weight = Parameter(torch.ones(3, 2, device=device, dtype=dtype))
                optimizer = optim_info.optim_cls([weight], lr=0.01)

                def closure(weight=weight, optimizer=optimizer, result=result):
                    self.assertTrue(torch.is_grad_enabled())
                    optimizer.zero_grad()
                    weight.pow(2).sum().backward()
                    return result

                if with_closure:
                    self.assertIs(optimizer.step(closure), result)
                else:
                    closure()
                    self.assertIsNone(optimizer.step())
                runs.append(weight.detach().clone())
            self.assertEqual(runs[0], runs[1], atol=0, rtol=0)
            self.assertFalse(torch.equal(runs[0], torch.ones_like(runs[0])))


instantiate_device_type_tests(TestOptimRenewed, globals(), only_for="cpu")


# -- MKOR and KFAC: the same conventions through their public API ---------------------
SERIAL = hpcqn.serial_comm()
LAYERWISE = ("mkor", "kfac")


def small_model(dtype=torch.float32, seed=0):
    """A convolution and a linear layer (both preconditioned)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)).to(dtype)


def build(kind, model, **extra):
    if kind == "kfac":
        return ht.KFAC(model, SERIAL, **{"lr": 0.05, "factor_freq": 1, "inv_freq": 2,
                                         "damping": 0.1, **extra})
    return ht.MKOR(model, SERIAL, **{"lr": 0.05, "factor_freq": 2, **extra})


def batch(step, dtype=torch.float32):
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 2, 6, 6, generator=generator, dtype=dtype),
            torch.randint(0, 4, (8,), generator=generator))


def loss_of(model, step):
    x, y = batch(step, next(model.parameters()).dtype)
    return torch.nn.functional.cross_entropy(model(x), y)


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def assert_same_tree(actual, expected, where="state_dict"):
    """Equal nested dicts/lists of tensors and plain values (tensors bitwise)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), where
        for key, value in expected.items():
            assert_same_tree(actual[key], value, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tree(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_optimizer_can_be_printed(kind):
    text = repr(build(kind, small_model()))
    assert text.startswith(kind.upper()) and "lr: 0.05" in text


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_forloop_goes_right_direction(kind, with_lrsched):
    model = small_model()
    opt = build(kind, model)
    schedulers = [StepLR(opt, step_size=5, gamma=0.9), ReduceLROnPlateau(opt)] \
        if with_lrsched else []
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        step_schedulers(schedulers, loss)
    assert closure().item() < initial


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_tensor_lr(kind):
    """A 0-d tensor lr steps exactly as its value as a float (torch accepts one)."""
    lr = torch.tensor(0.05)
    results = []
    for value in (float(lr), lr):
        model = small_model()
        train(model, build(kind, model, lr=value), 4)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_param_groups_lr_and_weight_decay(kind):
    """Groups of the first-order optimizer given as ``optimizer=``: a layer whose group
    has lr 1e-28 does not move, the loss falls, and a group's weight decay is its own."""
    model = small_model()
    conv, linear = list(model[0].parameters()), list(model[3].parameters())
    inner = torch.optim.SGD([{"params": conv, "lr": 1e-28},
                             {"params": linear, "weight_decay": 0.1}], lr=0.05,
                            momentum=0.9)
    opt = build(kind, model, optimizer=inner)
    fixed = [p.detach().clone() for p in conv]
    initial = loss_of(model, 0).item()
    for _ in range(10):
        opt.zero_grad()
        loss_of(model, 0).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(fixed, conv, strict=True))
    assert loss_of(model, 0).item() < initial
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_param_group_with_lrscheduler_goes_right_direction(kind):
    model = small_model()
    inner = torch.optim.SGD([{"params": model[0].parameters()},
                             {"params": model[3].parameters(), "lr": 0.01}], lr=0.05)
    opt = build(kind, model, optimizer=inner)
    schedulers = [StepLR(opt, step_size=5, gamma=0.9), ReduceLROnPlateau(opt)]
    initial = loss_of(model, 0).item()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        opt.step()
        step_schedulers(schedulers, loss)
    assert loss_of(model, 0).item() < initial


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_step_is_noop_when_params_have_no_grad(kind):
    """A layer whose parameters do not require a gradient at construction is accepted
    and never moves while the other layer trains; a model with no parameter to train
    at all is refused, naming why (nothing to precondition: a documented difference)."""
    model = small_model()
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    trained = flat(model)
    opt = build(kind, model)
    train(model, opt, 3)
    assert all(torch.equal(a, p) for a, p in zip(frozen, model[0].parameters(), strict=True))
    assert not torch.equal(flat(model), trained)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d layer to precondition.*"
                                         "does not require a gradient"):
        build(kind, small_model().requires_grad_(False))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_step_is_noop_for_zero_grads(kind):
    """Zero gradients (no weight decay) leave every parameter exactly where it was,
    on a step that updates the curvature too."""
    model = small_model()
    opt = build(kind, model)
    loss_of(model, 0).backward()
    for p in model.parameters():
        p.grad.zero_()
    before = flat(model)
    opt.step()
    assert torch.equal(flat(model), before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_state_dict_deterministic(kind):
    """Loaded into a new optimizer over an equal model: the same steps, equal state
    dicts."""
    model = small_model()
    opt = build(kind, model)
    train(model, opt, 5)
    twin = small_model(seed=1)
    twin.load_state_dict(model.state_dict())
    twin_opt = build(kind, twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 5, start=5)
    train(twin, twin_opt, 5, start=5)
    assert torch.equal(flat(model), flat(twin))
    assert_same_tree(dict(twin_opt.state_dict()), dict(opt.state_dict()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_can_load_older_state_dict_and_nontensor_step(kind):
    """With Adam inside (tensor step counts): a state dict without the flags torch
    added after Adam's first release, and with its step counts as Python numbers, loads
    and continues exactly as the unbroken run."""
    straight = small_model()
    train(straight, build(kind, straight, optimizer="adam", lr=1e-3), 6)
    model = small_model()
    opt = build(kind, model, optimizer="adam", lr=1e-3)
    train(model, opt, 3)
    older = copy.deepcopy(opt.state_dict())
    for group in older["param_groups"]:
        for flag in ("maximize", "foreach", "fused", "differentiable", "capturable"):
            group.pop(flag, None)
    for key, entry in older["state"].items():
        if isinstance(key, int) and torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].item()
    resumed = small_model(seed=1)
    resumed.load_state_dict(model.state_dict())
    fresh = build(kind, resumed, optimizer="adam", lr=1e-3)
    fresh.load_state_dict(older)
    train(resumed, fresh, 3, start=3)
    assert torch.equal(flat(resumed), flat(straight))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_save_load_equality_with_weights_only(kind):
    model = small_model()
    opt = build(kind, model)
    train(model, opt, 3)
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        assert_same_tree(dict(torch.load(buffer, weights_only=weights_only)), dict(saved))


@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_state_dict_pre_and_post_hooks(kind):
    """What a pre hook puts in ``opt.state`` reaches the state dict, the post hook
    sees it and may change the result (torch's three state-dict hook tests)."""
    opt = build(kind, small_model())
    opt.register_state_dict_post_hook(state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    opt.register_state_dict_pre_hook(state_dict_pre_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"]
    # the first-order optimizer's state dict is taken after the pre hooks ran
    assert state_dict["ran_state_dict_pre_hook"]


@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_load_state_dict_hooks(kind):
    """torch's load-state-dict hook tests: pre hooks in order (prepend first), one
    returning a new state dict, then the post hooks."""
    opt = build(kind, small_model())
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(load_state_dict_pre_hook1)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(load_state_dict_pre_hook2,
                                          prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    other = build(kind, small_model())
    other.register_load_state_dict_pre_hook(load_state_dict_pre_hook2)
    other.register_load_state_dict_post_hook(load_state_dict_post_hook)
    other.load_state_dict(other.state_dict())
    assert other.state["ran_load_state_dict_pre_hook2"] is True
    assert other.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_step_all_hooks(kind):
    """Global pre, own pre, own post, global post, once per step (the first-order
    optimizer inside fires none), and nothing once the handles are removed."""
    model = small_model()
    opt = build(kind, model)
    data = []
    handles = [register_optimizer_step_pre_hook(recorder(data, 0)),
               register_optimizer_step_post_hook(recorder(data, 5)),
               opt.register_step_pre_hook(recorder(data, 1)),
               opt.register_step_post_hook(recorder(data, 2))]
    try:
        train(model, opt, 2)
    finally:
        for handle in handles:
            handle.remove()
    train(model, opt, 1, start=2)
    assert data == [0, 1, 2, 5] * 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_deepcopy_copies_all_public_attrs_and_state_is_non_empty(kind):
    model = small_model()
    opt = build(kind, model)
    train(model, opt, 3)
    assert public_attributes(copy.deepcopy(opt)) == public_attributes(opt)
    assert len(opt.state) == len(list(model.parameters()))
    assert all(len(state) > 0 for state in opt.state.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_step_returns_what_the_closure_returns(kind):
    for result in (torch.tensor(2.5), 2.5, None):
        model = small_model()
        opt = build(kind, model)

        def closure(model=model, opt=opt, result=result):
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss_of(model, 0).backward()
            return result

        assert opt.step(closure) is result


@pytest.mark.parametrize("kind", LAYERWISE)
def test_layerwise_complex_and_mixed_dtype_are_refused_naming_why(kind):
    mixed = small_model()
    mixed[3].double()
    with pytest.raises(TypeError, match=r"model\.to\(dtype\)"):
        build(kind, mixed)
    complex_model = torch.nn.Sequential(torch.nn.Linear(3, 2, dtype=torch.complex64))
    with pytest.raises(TypeError) as refused:
        build(kind, complex_model)
    assert "does not support complex parameters" in str(refused.value)


def test_torch_suite_leaves_the_hypothesis_profile_as_it_was(request):
    """Importing torch's test infrastructure loads its own Hypothesis profile (10 or 50
    examples, derandomized in CI); the project's Hypothesis tests keep the profile pytest
    started with (Hypothesis's own "ci" profile where the environment says CI)."""
    import hypothesis
    from hypothesis._settings import is_in_ci

    started = (request.config.getoption("hypothesis_profile", None)
               or ("ci" if is_in_ci() else "default"))
    expected = hypothesis.settings.get_profile(started)
    active = hypothesis.settings.default
    for name in ("max_examples", "derandomize", "deadline", "database"):
        assert getattr(active, name) == getattr(expected, name), name
