"""Resolving a name read from a config or a file against an explicit allowlist.

A name that comes from outside the source code (an arch spec's ``_target_`` stored in a
model file, an artifact's ``format``) only *selects* an entry of a fixed table written in
compresslab's source. It is never walked as a dotted attribute path (the way Hydra's
``get_method`` does), so ``compresslab.models.common.torch.hub.load`` or a dunder path
cannot reach a callable that merely happens to be importable from an allowed module.

Each table entry names the module that *defines* the object and the object's name there;
the entry resolves only when ``obj.__module__`` is that module, so a helper that a module
imported from elsewhere cannot stand in for a definition.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping

from compresslab.errors import ConfigError


def defined_in(module_name: str, attr: str) -> Any:
    """The callable ``attr`` *defined* in ``module_name`` (not imported into it)."""
    module = importlib.import_module(module_name)
    obj = vars(module).get(attr)
    if obj is None or not callable(obj) or getattr(obj, "__module__", None) != module_name:
        raise ConfigError(f"{module_name}.{attr} is not a callable defined in {module_name}")
    return obj


class Allowlist:
    """A fixed mapping ``public name -> (defining module, attribute)``, resolved on demand.

    ``what`` names the kind of thing ("architecture", "artifact format") in error messages,
    ``hint`` tells the user what to do instead, and ``error`` is the exception type raised
    for a name outside the table.
    """

    def __init__(self, what: str, entries: Mapping[str, tuple[str, str]], hint: str,
                 error: type[Exception] = ConfigError):
        self.what, self.hint, self.error = what, hint, error
        self.entries = dict(entries)

    def names(self) -> list[str]:
        """The accepted names, sorted."""
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries

    def resolve(self, name: object) -> Callable:
        """The callable for ``name``; a clear error for anything not in the table."""
        if name not in self:
            shown = name if isinstance(name, str) and len(name) <= 200 else repr(name)[:200]
            raise self.error(
                f"Refused {self.what} {shown!r}: not in compresslab's allowlist. {self.hint} "
                f"Accepted: {', '.join(self.names())}."
            )
        module_name, attr = self.entries[name]
        return defined_in(module_name, attr)


def with_module_aliases(public_prefix: str, definitions: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, str]]:
    """Table entries for ``{defining module: [names]}``: each name is accepted as
    ``<public_prefix><name>`` (the package's re-export) and as ``<defining module>.<name>``."""
    table: dict[str, tuple[str, str]] = {}
    for module_name, attrs in definitions.items():
        for attr in attrs:
            table[f"{public_prefix}{attr}"] = (module_name, attr)
            table[f"{module_name}.{attr}"] = (module_name, attr)
    return table
