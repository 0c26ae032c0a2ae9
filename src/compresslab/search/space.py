"""The search space, written in Hydra's sweep syntax (``hydra.sweeper.params`` or command-line sweeps)
and turned into Optuna distributions:

- ``choice(a, b, c)`` / ``a,b,c``  -> ``CategoricalDistribution`` (config groups too: ``prune: choice(none, agp)``)
- ``range(1, 10)``                 -> ``IntDistribution`` with that step (stop excluded, as in Python)
- ``interval(0.1, 1.0)``           -> ``FloatDistribution`` (``IntDistribution`` when both ends are ints)
- ``tag(log, interval(1e-4, 1e-1))`` -> the same on a log scale

A plain value (``seed=3``) is passed to every trial unchanged.
"""

from __future__ import annotations

from typing import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Transformer
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from compresslab.errors import ConfigError


def distribution_of(override: Override) -> BaseDistribution | str:
    """One override as an Optuna distribution, or its value as a string when it is not a sweep."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    key = override.get_key_element()
    if override.is_choice_sweep():
        return CategoricalDistribution([str(x) for x in override.sweep_iterator(transformer=Transformer.encode)])
    value = override.value()
    if override.is_range_sweep():
        if value.shuffle:
            raise ConfigError(f"{key}: shuffle(range(...)) means nothing to a sampler; write range(...)")
        step = int(value.step)
        return IntDistribution(int(value.start), int(value.stop) - step, step=step)
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{key}={override.input_line}: a search takes choice(...), range(...), interval(...) "
                      "or tag(log, interval(...))")


def search_space(arguments: Iterable[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``(distributions, fixed)`` from Hydra override strings: what the sampler chooses per trial and
    what every trial gets as it is (both keyed by the override's key, ``+``/``~`` prefix included)."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        found = distribution_of(override)
        if isinstance(found, BaseDistribution):
            distributions[key] = found
        else:
            fixed[key] = found
    return distributions, fixed
