"""Declarative option checks: the type, enum and range of every option, declared once.

A config node's schema is a dataclass whose annotations are the option types and whose
:func:`option` metadata are the ranges; it is never instantiated (the yaml files hold the
defaults). :func:`check_options` checks a node against it and raises a
:class:`~compresslab.errors.ConfigError` that names the key, the value and what is allowed::

    @dataclass
    class AGPOptions:
        final_sparsity: float = option(ge=0, lt=1)
        unit: Literal["epoch", "step"] = option()

    check_options(AGPOptions, {"final_sparsity": 1.5}, "prune")
    # ConfigError: prune.final_sparsity=1.5 is not allowed: expected a number in [0, 1)

Types understood: ``int``, ``float`` (finite; an int is accepted), ``bool``, ``str``, ``Literal``
(an enum), ``Optional``/``Union``, ``list[X]``, ``dict[str, X]``, ``Any`` and a nested schema
dataclass (its keys checked under ``<key>.``). A range applies to the numbers inside the type
(the items of a list too). Rules between several keys stay as code beside their method.
Hand-written instead of pydantic: the whole mechanism is this module, its messages use the
config's dotted keys and yaml spelling (``null``, ``true``), and nothing is coerced (``"4"`` is
not 4, ``1.0`` is not an epoch).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, Mapping, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from compresslab.errors import ConfigError

#: keys of a method's config node that are not options (Hydra's target, the result label)
NOT_OPTIONS = ("_target_", "name")


def option(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, hint: str = "") -> Any:
    """A schema field: the range of its numbers (``ge``/``gt``/``le``/``lt``) and a ``hint``
    appended to the error message (what the option means, what to do)."""
    return dataclasses.field(metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "hint": hint})


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def show(value: Any) -> str:
    """``value`` as a user would write it in yaml / on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _range_text(meta: Mapping[str, Any]) -> str:
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _in_range(x: float, meta: Mapping[str, Any]) -> bool:
    return not ((meta.get("ge") is not None and x < meta["ge"]) or (meta.get("gt") is not None and x <= meta["gt"])
                or (meta.get("le") is not None and x > meta["le"]) or (meta.get("lt") is not None and x >= meta["lt"]))


def is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """What ``tp`` (with the range in ``meta``) allows, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "anything"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _range_text(meta)
    if tp is float:
        return "a finite number" + _range_text(meta)
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return show(args[0]) if len(args) == 1 else "one of " + ", ".join(show(a) for a in args)
    if origin is Union:
        return " or ".join(describe(a, meta) for a in sorted(args, key=lambda a: a is not type(None)))
    if origin is list:
        return f"a list of ({describe(args[0], meta)})"
    if origin is dict:
        return f"a mapping {{name: {describe(args[1], meta)}}}"
    if is_schema(tp):
        return "a mapping with the keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    raise TypeError(f"config_schema cannot check the type {tp!r}")


def matches(value: Any, tp: Any, meta: Mapping[str, Any]) -> bool:
    """Whether ``value`` (plain Python, as parsed from yaml) is allowed by ``tp`` and the range in ``meta``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        number = isinstance(value, int) or (tp is float and isinstance(value, float))
        return (number and not isinstance(value, bool) and math.isfinite(value) and _in_range(value, meta))
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is Union:
        return any(matches(value, a, meta) for a in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(matches(v, args[0], meta) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(v, args[1], meta) for v in value.values())
    if is_schema(tp):
        try:
            check_options(tp, value, "")
        except ConfigError:
            return False
        return True
    raise TypeError(f"config_schema cannot check the type {tp!r}")


def check_options(schema: type, node: Any, prefix: str) -> None:
    """Check the config ``node`` against the dataclass ``schema``; keys are named ``<prefix>.<key>``.

    A key the schema does not declare is refused (with the declared keys listed), unless the
    schema says ``partial: ClassVar[bool] = True``: then only its keys are checked (a node that
    also holds other settings). A declared key that is absent is fine: the default applies.
    """
    where = prefix or "this mapping"
    fields = {f.name: f for f in dataclasses.fields(schema)}
    partial = getattr(schema, "partial", False)
    if partial and isinstance(node, DictConfig):  # resolve only the keys checked here
        node = {k: node[k] for k in fields if k in node}
    node = _plain(node) if not isinstance(node, dict) else {k: _plain(v) for k, v in node.items()}
    if not isinstance(node, dict):
        raise ConfigError(f"{where}={show(node)} is not allowed: expected a mapping of options")
    hints = typing.get_type_hints(schema)
    if not partial:
        unknown = sorted(str(k) for k in node if k not in fields and k not in NOT_OPTIONS)
        if unknown:
            allowed = f"the options of {where} are {', '.join(fields)}" if fields else f"{where} takes no options"
            raise ConfigError(f"{', '.join(_key(prefix, k) for k in unknown)}: not an option here; {allowed}")
    for name, spec in fields.items():
        if name in node:
            _check_value(_key(prefix, name), node[name], hints[name], spec.metadata)


def _check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> None:
    """Raise the ConfigError for ``key=value`` unless it matches ``tp``; inside a list or mapping
    of the right shape, the message names the wrong item (``key[1]``, ``key.<name>``)."""
    if matches(value, tp, meta):
        return
    options = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    for alt in options:
        origin = typing.get_origin(alt)
        if is_schema(alt) and isinstance(value, dict):
            return check_options(alt, value, key)
        if origin is list and isinstance(value, (list, tuple)):
            bad = next(i for i, v in enumerate(value) if not matches(v, typing.get_args(alt)[0], meta))
            return _check_value(f"{key}[{bad}]", value[bad], typing.get_args(alt)[0], meta)
        if origin is dict and isinstance(value, dict):
            bad = next(k for k, v in value.items() if not matches(v, typing.get_args(alt)[1], meta))
            return _check_value(_key(key, bad), value[bad], typing.get_args(alt)[1], meta)
    hint = f" ({meta['hint']})" if meta.get("hint") else ""
    raise ConfigError(f"{key}={show(value)} is not allowed: expected {describe(tp, meta)}{hint}")


def _key(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


@dataclasses.dataclass
class NoOptions:
    """The schema of a method that takes no option besides its ``name``."""
