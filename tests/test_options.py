"""Options declared once (hpcqn.options): every declared option of every optimizer is
accepted, with a valid non-default value, by every front end that takes it (the class's
constructor, hpcqn.optimizers.registry.make, hpcqn.torch.methods.make and
hpcqn.minimize_stochastic); bad values are refused with messages naming the option; the
declared defaults are what the constructors store; deprecated names still work."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hpcqn
import hpcqn.torch as ht
from hpcqn import options
from hpcqn.layout import BlockLayout
from hpcqn.optimizers import registry
from hpcqn.optimizers.first_order import SGD, Adam
from hpcqn.optimizers.kfac import KFAC as CoreKFAC
from hpcqn.optimizers.mkor import MKOR as CoreMKOR
from hpcqn.optimizers.mkor import HybridSwitch
from hpcqn.optimizers.mlbfgs import MLBFGS as CoreMLBFGS
from hpcqn.options import OptionError, Rule, UnknownOptionError
from hpcqn.torch import methods

SERIAL = hpcqn.serial_comm()
BLOCK_CLASSES = {"mlbfgs": CoreMLBFGS, "sgd": SGD, "adam": Adam}
LAYER_CLASSES = {"MKOR": CoreMKOR, "KFAC": CoreKFAC, "HybridSwitch": HybridSwitch}
TORCH_CLASSES = {"MLBFGS": ht.MLBFGS, "MKOR": ht.MKOR, "KFAC": ht.KFAC, "LAMB": ht.LAMB}
# Options that need another one set to take their value (torch's Nesterov needs momentum).
COMPANIONS = {("sgd", "nesterov"): {"momentum": 0.9}, ("MKOR", "hybrid_window"): {"hybrid": True},
              ("MKOR", "hybrid_threshold"): {"hybrid": True}}


def other_value(option: options.Option) -> object:
    """A valid value of ``option`` that is not its default, from its rule alone."""
    rule, default = option.rule, option.default
    if rule.kind == "bool":
        return not default
    if rule.kind == "str":
        return next(c for c in rule.choices if c != default)
    if rule.kind == "int":
        return 1000 if default is None else default + 1
    if rule.kind == "pair":
        return tuple(_other_number(rule, float(v)) for v in default)
    return _other_number(rule, float(default))


def _other_number(rule: Rule, default: float) -> float:
    if rule.high is not None:
        value = (default + rule.high) / 2 if default != rule.high else default / 2
    else:
        value = 2 * default if default > 0 else 0.5
    assert options.check_value("x", dataclasses.replace(rule, kind="float"), value) == value
    assert value != default
    return value


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def layout() -> BlockLayout:
    return BlockLayout.from_sizes([3, 2], 1)


def build(name: str, values: dict) -> object:
    """The core class ``name`` built directly with ``values``."""
    if name in BLOCK_CLASSES:
        return BLOCK_CLASSES[name](layout(), SERIAL, **values)
    if name == "HybridSwitch":
        return HybridSwitch(**values)
    return LAYER_CLASSES[name]([(3, 4), (2, 3)], SERIAL, **values)


def build_torch(name: str, values: dict) -> torch.optim.Optimizer:
    """The torch class ``name`` built directly with ``values``."""
    if name == "LAMB":
        return ht.LAMB(model().parameters(), **values)
    if name == "MLBFGS":
        return ht.MLBFGS(model().parameters(), SERIAL, **values)
    return TORCH_CLASSES[name](model(), SERIAL, **values)


def stored(opt: object, name: str) -> object:
    """The value of option ``name`` that ``opt`` keeps (where it keeps it)."""
    if isinstance(opt, Adam) and name == "betas":
        return (opt.b1, opt.b2)
    if isinstance(opt, CoreMKOR) and name == "stats_dtype":
        return None if opt.stats_dtype == opt.dtype else opt.stats_dtype.name
    if isinstance(opt, torch.optim.Optimizer):
        if isinstance(opt, ht.MKOR) and name in ("hybrid_window", "hybrid_threshold"):
            return getattr(opt.switch, name[len("hybrid_"):])
        if isinstance(opt, ht.MKOR) and name == "hybrid":
            return opt.switch is not None
        if name == "optimizer":
            return type(opt.inner).__name__.lower()
        if name in opt.param_groups[0] and name != "params":
            return opt.param_groups[0][name]
        if hasattr(opt, "core") and not hasattr(type(opt), name) and name not in vars(opt):
            return stored(opt.core, name)
    return getattr(opt, name)


def core_cases():
    for name, klass in {**BLOCK_CLASSES, **LAYER_CLASSES}.items():
        for option in options.declared(klass).values():
            yield pytest.param(name, option, id=f"{name}-{option.name}")


def torch_cases():
    for name, klass in TORCH_CLASSES.items():
        for option in options.declared(klass).values():
            yield pytest.param(name, option, id=f"{name}-{option.name}")


def block_cases():
    for method in registry.METHODS:
        for option in registry.options_of(method).values():
            yield pytest.param(method, option, id=f"{method}-{option.name}")


def torch_method_cases():
    for method in methods.METHODS:
        for option in methods.options_of(method).values():
            yield pytest.param(method, option, id=f"{method}-{option.name}")


# -- every option through every front end ---------------------------------------------
@pytest.mark.parametrize(("name", "option"), list(core_cases()))
def test_core_constructor_takes_every_option(name, option):
    value = other_value(option)
    opt = build(name, {**COMPANIONS.get((name, option.name), {}), option.name: value})
    assert stored(opt, option.name) == value


@pytest.mark.parametrize(("name", "option"), list(torch_cases()))
def test_torch_constructor_takes_every_option(name, option):
    value = other_value(option)
    opt = build_torch(name, {**COMPANIONS.get((name, option.name), {}), option.name: value})
    assert stored(opt, option.name) == value


@pytest.mark.parametrize(("method", "option"), list(block_cases()))
def test_registry_make_takes_every_option(method, option):
    value = other_value(option)
    opt = registry.make(method, layout(), SERIAL, {option.name: value})
    assert isinstance(opt, BLOCK_CLASSES[method])
    assert stored(opt, option.name) == value


@pytest.mark.parametrize(("method", "option"), list(torch_method_cases()))
def test_torch_methods_make_takes_every_option(method, option):
    value = other_value(option)
    if isinstance(value, tuple):
        value = list(value)  # as a job file gives it
    values = {**COMPANIONS.get((method, option.name), {}), option.name: value}
    opt = methods.make(method, model(), SERIAL, values)
    got = stored(opt, option.name)
    assert got == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize(("method", "option"), list(block_cases()))
def test_minimize_stochastic_takes_every_option(method, option):
    if option.name == "mode":
        pytest.skip("minimize_stochastic drives the replicated mode itself")

    def fun(x, batch):
        return 0.5 * float((x - 1.0) @ (x - 1.0)), x - 1.0

    result = hpcqn.minimize_stochastic(
        fun, np.zeros(5), [None] * 3, method=method, comm=SERIAL,
        options={option.name: other_value(option), "epochs": 1, "disp": False})
    assert result.nit == 3


def test_front_ends_list_every_core_option():
    """The torch wrappers take every option of the core they wrap (but the mode of the
    block step, which the bridge fixes), and the job-file names those of the classes."""
    assert set(options.declared(CoreMLBFGS)) - {"mode"} <= set(options.declared(ht.MLBFGS))
    assert "min_cos" in options.declared(ht.MLBFGS)
    assert set(options.declared(CoreMKOR)) <= set(options.declared(ht.MKOR))
    assert set(options.declared(CoreKFAC)) <= set(options.declared(ht.KFAC))
    assert set(registry.options_of("mlbfgs")) == set(options.declared(CoreMLBFGS))
    assert set(methods.options_of("mlbfgs")) == set(options.declared(ht.MLBFGS))
    mkor = set(options.declared(ht.MKOR)) - {"hybrid"}
    assert set(methods.options_of("mkor_h")) == mkor
    assert set(methods.options_of("mkor")) == mkor - {"hybrid_window", "hybrid_threshold"}
    assert set(methods.options_of("sgd")) == {"lr", "momentum", "dampening", "weight_decay",
                                              "nesterov", "maximize"}
    assert set(methods.options_of("adam")) == {"lr", "betas", "eps", "weight_decay",
                                               "amsgrad", "maximize"}


def test_methods_make_builds_what_the_name_says():
    assert methods.make("mkor_h", model(), SERIAL, {}).switch is not None
    assert methods.make("mkor", model(), SERIAL, {}).switch is None
    assert isinstance(methods.make("kfac", model(), SERIAL, {}), ht.KFAC)
    assert isinstance(methods.make("mlbfgs", model(), SERIAL, {}), ht.MLBFGS)
    adam = methods.make("adam", model(), SERIAL, {"lr": 0.01, "betas": [0.8, 0.9]})
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.9)
    assert isinstance(methods.make("sgd", model(), SERIAL, {"lr": 0.1}), torch.optim.SGD)
    for key, value in (("hybrid", True), ("hybrid_window", 10)):  # mkor_h's, by the name
        with pytest.raises(OptionError, match=key):
            methods.make("mkor", model(), SERIAL, {key: value})
    for make in (lambda: methods.make("lbfgs", model(), SERIAL, {}),
                 lambda: registry.make("mkor", layout(), SERIAL, {})):
        with pytest.raises(OptionError, match="unknown method"):
            make()
    with pytest.raises(OptionError, match="unknown method 'lbfgs'"):
        methods.options_of("lbfgs")
    with pytest.raises(OptionError, match="unknown method 'newton'"):
        registry.options_of("newton")


# -- defaults -------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*BLOCK_CLASSES, *LAYER_CLASSES])
def test_declared_defaults_are_what_the_constructor_stores(name):
    opt = build(name, {})
    for option in options.declared(type(opt)).values():
        assert stored(opt, option.name) == option.default, option.name


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_torch_declared_defaults_are_what_the_constructor_stores(name):
    plain = build_torch(name, {})
    hybrid = build_torch(name, {"hybrid": True}) if name == "MKOR" else plain
    for option in options.declared(type(plain)).values():
        opt = hybrid if option.name.startswith("hybrid_") else plain
        assert stored(opt, option.name) == option.default, option.name


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_torch_first_order_defaults_are_torchs(method):
    opt = methods.make(method, model(), SERIAL, {})
    for option in methods.options_of(method).values():
        assert opt.param_groups[0][option.name] == option.default, option.name


# -- bad values -----------------------------------------------------------------------
BAD = [
    ("history", 2.7), ("history", True), ("history", "ten"), ("history", 0),
    ("beta", True), ("beta", 1.0), ("beta", -0.1), ("beta", math.nan),
    ("weight_decay", math.inf), ("weight_decay", -1.0), ("lr", 0.0), ("lr", math.inf),
    ("normalize_direction", 1), ("momentum_form", "nesterov"), ("min_cos", 1.0),
    ("sigma_l", 0.0), ("sigma_h", 1.0), ("mode", "everywhere"), ("period", 1.5),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_bad_values_are_refused_naming_the_option(key, value):
    with pytest.raises(OptionError, match=key):
        CoreMLBFGS(layout(), SERIAL, **{key: value})
    with pytest.raises(OptionError, match=f"where: option {key} must be"):
        options.check(registry.options_of("mlbfgs"), {key: value}, "where")
    with pytest.raises(OptionError, match=key):
        registry.make("mlbfgs", layout(), SERIAL, {key: value})
    if key != "mode":
        with pytest.raises(OptionError, match=key):
            methods.make("mlbfgs", model(), SERIAL, {key: value})


@pytest.mark.parametrize(("method", "key", "value"), [
    ("sgd", "momentum", -0.1), ("sgd", "nesterov", 1), ("adam", "betas", (0.9, 1.0)),
    ("adam", "betas", 0.9), ("adam", "eps", 0.0), ("sgd", "lr", True)])
def test_bad_first_order_values(method, key, value):
    with pytest.raises(OptionError, match=key):
        registry.make(method, layout(), SERIAL, {key: value})
    with pytest.raises(OptionError, match=key):
        methods.make(method, model(), SERIAL, {key: value})


@pytest.mark.parametrize(("method", "key", "value"), [
    ("mkor", "factor_freq", 2.7), ("mkor", "factor_decay", 1.0), ("mkor", "eps_stab", 0.0),
    ("mkor", "factor_dtype", "int8"), ("mkor_h", "hybrid_window", 0),
    ("mkor_h", "hybrid_threshold", -1.0), ("mkor", "clamp", math.inf),
    ("mkor", "optimizer", "rmsprop"), ("kfac", "damping", 0.0), ("kfac", "kl_clip", -1.0),
    ("kfac", "inv_freq", True), ("kfac", "method", "cholesky"), ("kfac", "placement", "all"),
    ("mlbfgs", "max_block_size", 0)])
def test_bad_layerwise_values(method, key, value):
    with pytest.raises(OptionError, match=key):
        methods.make(method, model(), SERIAL, {key: value})


def test_unknown_names_are_refused_naming_them():
    with pytest.raises(UnknownOptionError, match="maxcor"):
        registry.make("mlbfgs", layout(), SERIAL, {"maxcor": 3})
    with pytest.raises(UnknownOptionError, match="maxcor"):
        methods.make("mlbfgs", model(), SERIAL, {"maxcor": 3})
    with pytest.raises(TypeError, match="maxcor"):  # as Python's own for a bad keyword
        ht.MKOR(model(), SERIAL, maxcor=3)
    with pytest.raises(TypeError, match="mode"):  # the bridge's step is the replicated one
        ht.MLBFGS(model().parameters(), SERIAL, mode="sharded")
    with pytest.raises(OptionError, match="unknown option.*'foo'"):
        options.check(methods.options_of("adam"), {"foo": 1})


def test_relations_between_options_are_still_checked():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(layout(), SERIAL, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="multiple of factor_freq"):
        CoreKFAC([(2, 3)], SERIAL, inv_freq=10, factor_freq=3)


def test_a_parameter_without_a_rule_is_a_declaration_bug():
    class Careless:
        OPTION_RULES = {"a": Rule("int")}

        def __init__(self, a: int = 1, b: float = 2.0):
            pass

    with pytest.raises(TypeError, match="'b' has no entry in OPTION_RULES"):
        options.declared(Careless)

    class Renamed:
        OPTION_RULES = {"a": Rule("int")}
        DEPRECATED = {"old": "nowhere"}

        def __init__(self, a: int = 1):
            pass

    with pytest.raises(TypeError, match="nowhere"):
        options.declared(Renamed)


def test_rules_are_strict():
    check = options.check_value
    assert check("n", Rule("int", low=1), np.int64(3)) == 3
    assert check("x", Rule("float"), 2) == 2.0 and isinstance(check("x", Rule("float"), 2), float)
    assert check("x", Rule("float", finite=False), math.inf) == math.inf
    assert check("p", Rule("pair"), [1, 2]) == (1.0, 2.0)
    assert check("s", Rule("str", choices=("a",), none=True), None) is None
    assert callable(check("lr", Rule("schedule", low=0.0, open_low=True), lambda t: 0.1))
    for rule, value in [(Rule("int"), 2.7), (Rule("int"), True), (Rule("float"), True),
                        (Rule("float"), math.inf), (Rule("float"), math.nan),
                        (Rule("float", finite=False), math.nan), (Rule("bool"), 1),
                        (Rule("pair"), (1.0, 2.0, 3.0)), (Rule("pair"), "ab"),
                        (Rule("str", choices=("a",)), None), (Rule("int", low=0), -1),
                        (Rule("float", low=0.0, open_low=True), 0.0)]:
        with pytest.raises(OptionError, match="option key must be"):
            check("key", rule, value)


# -- deprecated names -----------------------------------------------------------------
@pytest.mark.parametrize(("make", "old", "new", "value"), [
    (lambda v: CoreMLBFGS(layout(), SERIAL, **v), "damping", "pair_damping", 0.05),
    (lambda v: CoreMKOR([(2, 3)], SERIAL, **v), "gam", "factor_decay", 0.8),
    (lambda v: CoreMKOR([(2, 3)], SERIAL, **v), "inv_freq", "factor_freq", 3),
    (lambda v: ht.MLBFGS(model().parameters(), SERIAL, **v), "damping", "pair_damping", 0.05),
    (lambda v: ht.MKOR(model(), SERIAL, **v), "gam", "factor_decay", 0.8),
    (lambda v: ht.MKOR(model(), SERIAL, **v), "inv_freq", "factor_freq", 3),
    (lambda v: registry.make("mlbfgs", layout(), SERIAL, v), "damping", "pair_damping", 0.05),
    (lambda v: methods.make("mlbfgs", model(), SERIAL, v), "damping", "pair_damping", 0.05),
    (lambda v: methods.make("mkor_h", model(), SERIAL, v), "gam", "factor_decay", 0.8),
    (lambda v: methods.make("mkor", model(), SERIAL, v), "inv_freq", "factor_freq", 3),
])
def test_deprecated_names_still_work(make, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated; use '{new}'"):
        opt = make({old: value})
    assert stored(opt, new) == value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name: no warning
        assert stored(make({new: value}), new) == value
    with pytest.raises(OptionError, match=f"{old} is the deprecated name of {new}"):
        make({old: value, new: value})


def test_old_names_validate_in_job_file_tables():
    with pytest.warns(DeprecationWarning, match="factor_freq"):
        checked = options.check(methods.options_of("mkor"), {"inv_freq": 10, "lr": 0.1})
    assert checked == {"factor_freq": 10, "lr": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K-FAC's inv_freq is its own option
        assert options.check(methods.options_of("kfac"), {"inv_freq": 10}) == {"inv_freq": 10}
    with pytest.warns(DeprecationWarning, match="pair_damping"):
        assert options.check(registry.options_of("mlbfgs"), {"damping": 0}) == {
            "pair_damping": 0.0}
    with pytest.raises(OptionError, match="factor_decay"), pytest.warns(DeprecationWarning):
        options.check(methods.options_of("mkor"), {"gam": 1.5})
    merged = {"epochs": options.Option("epochs", 1, Rule("int")), **registry.options_of("mlbfgs")}
    with pytest.warns(DeprecationWarning, match="pair_damping"):  # a merged spec keeps them
        assert options.check(merged, {"damping": 0.1, "epochs": 2}) == {
            "pair_damping": 0.1, "epochs": 2}


def test_old_and_new_names_give_the_same_run():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(5) for _ in range(12)]
    runs = []
    for name in ("damping", "pair_damping"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            opt = CoreMLBFGS(layout(), SERIAL, period=2, **{name: 0.3})
        x = np.zeros(5)
        for g in grads:
            opt.step(x, g + x)
        runs.append(x)
    np.testing.assert_array_equal(*runs)


def test_minimize_stochastic_takes_the_old_name_too():
    def fun(x, batch):
        return 0.5 * float((x - batch) @ (x - batch)), x - batch

    batches = [np.full(5, float(k)) for k in range(8)]
    runs = []
    for name in ("damping", "pair_damping"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            result = hpcqn.minimize_stochastic(
                fun, np.zeros(5), batches, method="mlbfgs", comm=SERIAL,
                options={name: 0.3, "period": 2, "disp": False})
        assert any("pair_damping" in str(w.message) for w in caught) == (name == "damping")
        runs.append(result.x)
    np.testing.assert_array_equal(*runs)
