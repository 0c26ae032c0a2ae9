"""Declarative option checks (issue #23 item 6, #24 item 3): every option of every method and the
run's numeric options are refused, before anything trains, with a message naming the key, the
value and what is allowed. Fast: configs are composed and checked, nothing is fitted."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import time
import typing
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf

from compresslab.compress import build_methods
from compresslab.config_schema import check_options, is_schema, option, show
from compresslab.errors import ConfigError
from compresslab.run_options import check_run_options

AXES = ("prune", "quant", "lowrank", "fuse")
METHOD_CONFIGS = [(axis, p.stem) for axis in AXES for p in sorted((CONF_DIR / axis).glob("*.yaml"))
                  if p.stem != "none"]


@functools.lru_cache(maxsize=None)
def _method_node(axis: str, name: str) -> dict:
    """The composed ``<axis>=<name>`` node as plain data (student.epochs at the default 15)."""
    cfg = compose_config(Path("/nonexistent"), ["logger=none", f"{axis}={name}"], fast=False)
    return OmegaConf.to_container(cfg[axis], resolve=True)


def _schema(axis: str, name: str) -> type:
    from hydra.utils import get_class

    return get_class(_method_node(axis, name)["_target_"]).options


def _init_params(cls: type) -> set[str]:
    """Every argument the constructor chain takes (following ``**kwargs`` to the base classes)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - {"self", "name"}


@pytest.mark.parametrize("axis, name", METHOD_CONFIGS)
def test_every_option_of_every_method_is_declared_once(axis, name):
    from hydra.utils import get_class

    node = _method_node(axis, name)
    cls = get_class(node["_target_"])
    assert cls.options is not None and is_schema(cls.options), f"{cls.__name__} declares no options schema"
    declared = {f.name for f in dataclasses.fields(cls.options)}
    configured = set(node) - {"_target_", "name"}
    assert configured <= declared, f"conf/{axis}/{name}.yaml options without a declared type: {configured - declared}"
    assert declared <= _init_params(cls), f"declared but not taken by {cls.__name__}: {declared - _init_params(cls)}"
    (method,) = build_methods(OmegaConf.create({axis: node}))  # the shipped values pass
    assert type(method) is cls


def _core(tp):
    """The types inside Optional/Union."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)


def _bad_values(tp, meta) -> list[tuple[str, object, str]]:
    """(kind, value, suffix of the key the message must name) for a field: one value of the wrong
    type and, where the field has a range or an enum, one outside it."""
    alts = [a for a in _core(tp) if a is not type(None)]
    out = [("type", "abc" if float in alts else 3.5, "")]
    bound = next(((meta[k], k) for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None), None)
    if bound is not None:
        value, k = bound
        number = value - 1 if k == "ge" else value + 1 if k == "le" else value
        container = next((a for a in alts if typing.get_origin(a) in (list, dict)), None)
        if container is not None and not any(a in (int, float) for a in alts):
            if typing.get_origin(container) is list:
                out.append(("range", [number], "[0]"))
            else:
                out.append(("range", {"x": number}, ".x"))
        else:
            out.append(("range", number, ""))
    literal = next((a for a in alts if typing.get_origin(a) is typing.Literal), None)
    if literal is not None and bound is None:
        out.append(("enum", "no_such_choice", ""))
    inner = next((a for a in alts if typing.get_origin(a) is list
                  and typing.get_origin(typing.get_args(a)[0]) is typing.Literal), None)
    if inner is not None:
        out.append(("enum", [99], "[0]"))
    return out


def _method_cases():
    for axis, name in METHOD_CONFIGS:
        schema = _schema(axis, name)
        stack = [((), schema)]
        while stack:
            path, sch = stack.pop()
            hints = typing.get_type_hints(sch)
            for f in dataclasses.fields(sch):
                nested = [a for a in _core(hints[f.name]) if is_schema(a)]
                if nested:
                    stack.append(((*path, f.name), nested[0]))
                for kind, value, suffix in _bad_values(hints[f.name], f.metadata):
                    key = ".".join((*path, f.name))
                    yield pytest.param(axis, name, (*path, f.name), value, suffix, id=f"{axis}={name}:{key}:{kind}")


@pytest.mark.parametrize("axis, name, path, value, suffix", list(_method_cases()))
def test_every_bad_option_value_is_refused_naming_the_key_and_what_is_allowed(axis, name, path, value, suffix):
    node = copy.deepcopy(_method_node(axis, name))
    where = node
    for part in path[:-1]:  # into a nested option (a null one becomes a mapping)
        if not isinstance(where.get(part), dict):
            where[part] = {}
        where = where[part]
    where[path[-1]] = value
    key = ".".join((axis, *path)) + suffix
    with pytest.raises(ConfigError) as err:
        build_methods(OmegaConf.create({axis: node}))
    message = str(err.value)
    assert message.startswith(f"{key}="), message
    assert "is not allowed: expected " in message, message


@pytest.mark.parametrize("override, message", [
    ("quant=lowbit quant.bits=9", "quant.bits=9 is not allowed: expected one of 2, 3, 4, 5, 6, 7, 8, 'ternary', "
                                  "'binary'"),
    ("prune=agp prune.final_sparsity=1.5", "prune.final_sparsity=1.5 is not allowed: expected a finite number in [0, 1)"),
    ("prune=agp prune.unit=epochs", "prune.unit='epochs' is not allowed: expected one of 'epoch', 'step'"),
    ("prune=lottery prune.lottery.reinit=shuffle", "prune.lottery.reinit='shuffle' is not allowed: expected one of "
                                                   "'rewind', 'random'"),
    ("quant=lsq quant.sensitivity.candidates=[2,9]", "quant.sensitivity.candidates[1]=9 is not allowed"),
    ("quant=lsq quant.bits_per_layer={conv1:fp16}", "quant.bits_per_layer.conv1='fp16' is not allowed"),
    ("quant=ptq_int8 quant.calibration_split=test", "quant.calibration_split='test' is not allowed: expected one of "
                                                    "'train', 'val'"),
    ("quant=lsq +quant.weight_bitz=4", "quant.weight_bitz: not an option here; the options of quant are scheme, "
                                       "weight_bits"),
    ("lowrank=svd lowrank.min_rank=0", "lowrank.min_rank=0 is not allowed: expected an integer >= 1"),
    ("prune=structured prune.start=2.5", "prune.start=2.5 is not allowed: expected an integer >= 0"),
    ("fuse=bn +fuse.mode=all", "fuse.mode: not an option here; fuse takes no options"),
])
def test_method_messages_read_as_written(override, message):
    cfg = compose_config(Path("/nonexistent"), ["logger=none", *override.split()], fast=False)
    with pytest.raises(ConfigError) as err:
        build_methods(cfg)
    assert str(err.value).startswith(message), str(err.value)


def test_a_method_built_directly_checks_its_options_too():
    from compresslab.compress.prune import AGPPruning
    from compresslab.compress.quant.lowbit import LowBit

    with pytest.raises(ConfigError, match=r"^prune.final_sparsity=1.2 is not allowed"):
        AGPPruning("agp", final_sparsity=1.2)
    with pytest.raises(ConfigError, match=r"^quant.act_bits=1 is not allowed: expected null or an integer in \[2, 8\]"):
        LowBit("lowbit", act_bits=1)
    with pytest.raises(ConfigError, match="^quant.bitz: not an option here"):
        LowBit("lowbit", bitz=4)
    assert copy.deepcopy(AGPPruning("agp", final_sparsity=0.5)).final_sparsity == 0.5


# ---- the run's numeric options -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _run_cfg():
    return compose_config(Path("/nonexistent"), ["logger=none"], fast=False)


NAN = float("nan")
RUN_CASES = [  # (key, bad value, the start of the message)
    ("student.optimizer.lr", -1, "student.optimizer.lr=-1 is not allowed: expected a finite number > 0"),
    ("student.optimizer.lr", 0.0, "student.optimizer.lr=0.0 is not allowed"),
    ("student.optimizer.lr", NAN, "student.optimizer.lr=nan is not allowed"),
    ("teacher.optimizer.lr", math.inf, "teacher.optimizer.lr=inf is not allowed"),
    ("teacher.optimizer.lr", "fast", "teacher.optimizer.lr='fast' is not allowed"),
    ("student.label_smoothing", 1.0, "student.label_smoothing=1.0 is not allowed: expected a finite number in [0, 1)"),
    ("teacher.label_smoothing", -0.1, "teacher.label_smoothing=-0.1 is not allowed"),
    ("student.epochs", 0, "student.epochs=0 is not allowed: expected an integer >= 1"),
    ("teacher.epochs", 2.5, "teacher.epochs=2.5 is not allowed: expected an integer >= 1"),
    ("measure.latency_rounds", 0, "measure.latency_rounds=0 is not allowed: expected an integer >= 1"),
    ("measure.latency_warmup", -1, "measure.latency_warmup=-1 is not allowed: expected an integer >= 0"),
    ("measure.latency_round_ms", 0, "measure.latency_round_ms=0 is not allowed: expected a finite number > 0"),
    ("measure.latency_batch", 0, "measure.latency_batch=0 is not allowed: expected an integer >= 1"),
    ("measure.threads_b1", 0, "measure.threads_b1=0 is not allowed: expected an integer >= 1 or 'auto'"),
    ("measure.threads_bN", "all", "measure.threads_bN='all' is not allowed: expected an integer >= 1 or 'auto'"),
    ("measure.threads", 0, "measure.threads=0 is not allowed: expected null or an integer >= 1"),
    ("measure.clock", "gpu", "measure.clock='gpu' is not allowed: expected one of 'cpu', 'wall'"),
    ("measure.reliability.max_spread", -0.5, "measure.reliability.max_spread=-0.5 is not allowed"),
    ("measure.reliability.max_twin_deviation", 0, "measure.reliability.max_twin_deviation=0 is not allowed"),
    ("measure.reliability.max_ci_width", NAN, "measure.reliability.max_ci_width=nan is not allowed"),
    ("measure.reliability.max_other_cpu", 1.5, "measure.reliability.max_other_cpu=1.5 is not allowed: expected a "
                                                "finite number in (0, 1]"),
    ("measure.defer", "later", "measure.defer='later' is not allowed: expected true or false or 'auto'"),
    ("measure.fresh_process", 1, "measure.fresh_process=1 is not allowed: expected true or false"),
    ("eval.class_bias", {3: NAN}, "eval.class_bias.3=nan is not allowed: expected a finite number or 'val'"),
    ("eval.class_bias_grid", [0.0, math.inf], "eval.class_bias_grid[1]=inf is not allowed"),
    ("seed", -1, "seed=-1 is not allowed: expected an integer in [0, 4294967295]"),
    ("seed", 2**32, "seed=4294967296 is not allowed: expected an integer in [0, 4294967295]"),
    ("dataset.test_fraction", 1.5, "dataset.test_fraction=1.5 is not allowed: expected a finite number in (0, 1)"),
    ("dataset.test_fraction", 0, "dataset.test_fraction=0 is not allowed"),
    ("dataset.val_fraction", 1.0, "dataset.val_fraction=1.0 is not allowed: expected a finite number in (0, 1)"),
    ("dataset.train_fraction", 0, "dataset.train_fraction=0 is not allowed: expected a finite number in (0, 1]"),
    ("dataset.unlabeled_fraction", -0.1, "dataset.unlabeled_fraction=-0.1 is not allowed"),
    ("dataset.batch_size", 0, "dataset.batch_size=0 is not allowed: expected an integer >= 1"),
    ("dataset.eval_batch_size", True, "dataset.eval_batch_size=true is not allowed: expected null or an integer >= 1"),
    ("dataset.num_workers", -1, "dataset.num_workers=-1 is not allowed: expected an integer >= 0"),
    ("dataset.split_seed", -3, "dataset.split_seed=-3 is not allowed"),
    ("scaling.lr", "cubic", "scaling.lr='cubic' is not allowed: expected one of 'none', 'linear', 'sqrt'"),
    ("performance.channels_last", "yes", "performance.channels_last='yes' is not allowed: expected true or false or "
                                         "'auto'"),
    ("resume", "no", "resume='no' is not allowed: expected true or false"),
]


@pytest.mark.parametrize("key, value, message", RUN_CASES, ids=[f"{k}={show(v)}" for k, v, _ in RUN_CASES])
def test_every_numeric_run_option_is_range_checked(key, value, message):
    cfg = copy.deepcopy(_run_cfg())
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        check_run_options(cfg)
    assert str(err.value).startswith(message), str(err.value)


def test_the_shipped_run_options_pass_and_a_loaded_teachers_recipe_is_not_checked():
    cfg = copy.deepcopy(_run_cfg())
    check_run_options(cfg)
    OmegaConf.update(cfg, "teacher.epochs", 0)  # a teacher from teacher.ckpt does not train (a cross-key rule)
    OmegaConf.update(cfg, "teacher.ckpt", "teacher.pt")
    check_run_options(cfg)
    OmegaConf.update(cfg, "teacher.ckpt", None)
    with pytest.raises(ConfigError, match="^teacher.epochs=0 is not allowed"):
        check_run_options(cfg)


def test_pipeline_validate_checks_the_run_options(tmp_path):
    from compresslab.pipeline import build_datamodule, validate

    cfg = compose_config(tmp_path, ["teacher=none"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    OmegaConf.update(cfg, "student.optimizer.lr", -1.0)
    with pytest.raises(ConfigError, match=r"^student.optimizer.lr=-1.0 is not allowed"):
        validate(cfg, dm)


@pytest.mark.parametrize("override, message", [
    ("student.optimizer.lr=-1", "student.optimizer.lr=-1 is not allowed"),
    ("measure.latency_batch=0", "measure.latency_batch=0 is not allowed"),
])
def test_a_bad_run_option_fails_in_seconds_before_the_teacher_trains(make_cfg, override, message):
    from compresslab.pipeline import run_experiment

    cfg = make_cfg([override, "teacher.epochs=3"])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg)
    assert time.perf_counter() - start < 10
    assert not Path(cfg.paths.teacher_cache).exists() or not any(Path(cfg.paths.teacher_cache).iterdir())
    record = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())
    assert record["status"] == "failed" and message in record["error"]


# ---- the mechanism itself ------------------------------------------------------------------------
@dataclasses.dataclass
class _Inner:
    k: int = option(ge=1)


@dataclasses.dataclass
class _Toy:
    ratio: float = option(gt=0, le=1, hint="a share")
    mode: typing.Literal["a", "b"] = option()
    inner: typing.Optional[_Inner] = option()
    names: list[str] = option()


@pytest.mark.parametrize("node, message", [
    ({"ratio": 0}, "toy.ratio=0 is not allowed: expected a finite number in (0, 1] (a share)"),
    ({"ratio": True}, "toy.ratio=true is not allowed"),
    ({"ratio": "0.5"}, "toy.ratio='0.5' is not allowed"),  # nothing is coerced
    ({"mode": "c"}, "toy.mode='c' is not allowed: expected one of 'a', 'b'"),
    ({"inner": {"k": 0}}, "toy.inner.k=0 is not allowed: expected an integer >= 1"),
    ({"inner": {"j": 1}}, "toy.inner.j: not an option here; the options of toy.inner are k"),
    ({"inner": 3}, "toy.inner=3 is not allowed: expected null or a mapping with the keys k"),
    ({"names": ["x", 2]}, "toy.names[1]=2 is not allowed: expected a string"),
])
def test_check_options_messages(node, message):
    with pytest.raises(ConfigError) as err:
        check_options(_Toy, node, "toy")
    assert str(err.value).startswith(message), str(err.value)
    check_options(_Toy, {"ratio": 1, "mode": "b", "inner": None, "names": []}, "toy")  # int for float is fine
