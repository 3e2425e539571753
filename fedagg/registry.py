"""One registry mechanism for every family of named things (aggregators, attacks, strategies,
merge methods, datasets, partitioners, models, ...).

As in mergekit, an entry declares its parameters once (name, type, default, doc, allowed values or
bounds); the same declaration validates config files and CLI overrides, fills defaults and renders
docs. A typo fails early with a :class:`~fedagg.errors.ConfigError` that names the key and lists
what is allowed.

Example
-------
>>> REG = Registry("aggregator")
>>> @REG.register("mean", doc="Coordinate-wise mean.")
... def build_mean():
...     return lambda x, weights=None: x.mean(axis=0)
>>> REG.names()
['mean']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from fedagg.errors import ConfigError, unknown_name

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclasses.dataclass(frozen=True)
class Param:
    """A declared parameter of a registry entry.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``list``, ``dict`` or ``object``
    (no checking). ``choices`` closes the set of values; ``low``/``high`` bound numbers
    (inclusive unless ``low_open``/``high_open``). ``nullable`` allows ``None``.
    """

    name: str
    type: type = object
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Coerce and validate ``value``; raise ConfigError naming ``where``."""
        field = f"{where}.{self.name}" if where else self.name
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise ConfigError(field, "must not be null")
        value = _coerce(value, self.type, field)
        if self.choices is not None and value not in self.choices:
            raise unknown_name(field, value, [str(c) for c in self.choices])
        if self.type in (int, float):
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                op = ">" if self.low_open else ">="
                raise ConfigError(field, f"must be {op} {self.low}, got {value}")
            if self.high is not None and (
                value > self.high or (self.high_open and value == self.high)
            ):
                op = "<" if self.high_open else "<="
                raise ConfigError(field, f"must be {op} {self.high}, got {value}")
        return value

    def describe(self) -> str:
        """One line for --help and docs."""
        parts = [f"{self.name} ({getattr(self.type, '__name__', str(self.type))}"]
        parts.append(", required)" if self.required else f", default {self.default!r})")
        if self.choices is not None:
            parts.append(f" one of {list(self.choices)}")
        if self.doc:
            parts.append(f": {self.doc}")
        return "".join(parts)


def _coerce(value: Any, typ: type, field: str) -> Any:
    if typ is object:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(field, f"expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(field, f"expected a number, got {value!r}")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(field, f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(field, f"must be a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, f"expected a string, got {value!r}")
    if typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(field, f"expected a list, got {value!r}")
    if typ is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(field, f"expected a mapping, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(field, f"expected {typ.__name__}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered name: its factory, declared parameters and one-paragraph doc."""

    name: str
    factory: Callable[..., T]
    params: tuple[Param, ...] = ()
    doc: str = ""

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def resolve(self, params: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Validated keyword arguments: declared params only, defaults filled in."""
        declared = {p.name: p for p in self.params}
        where = where or self.name
        for key in params:
            if key not in declared:
                allowed = ", ".join(sorted(declared)) or "(none)"
                raise ConfigError(
                    f"{where}.{key}", f"unknown parameter for {self.name!r}; allowed: {allowed}"
                )
        out: dict[str, Any] = {}
        for name, p in declared.items():
            if name in params:
                out[name] = p.check(params[name], where)
            elif p.required:
                raise ConfigError(f"{where}.{name}", f"required by {self.name!r}")
            else:
                out[name] = p.default
        return out


class Registry(Generic[T]):
    """Names → factories with declared parameters. ``kind`` names the family in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, params: Iterable[Param] = (), doc: str = ""
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, params=params, doc=doc)
            return factory

        return deco

    def add(
        self, name: str, factory: Callable[..., T], *, params: Iterable[Param] = (), doc: str = ""
    ) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        text = doc or (factory.__doc__ or "").strip().split("\n\n")[0]
        self._entries[name] = Entry(name, factory, tuple(params), " ".join(text.split()))

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str, field: str | None = None) -> Entry[T]:
        """The entry for ``name``; ConfigError listing the allowed names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(field or self.kind, name, self._entries) from None

    def build(self, name: str, /, **params: Any) -> T:
        """Validate ``params`` against the declaration and call the factory."""
        entry = self.entry(name)
        return entry.factory(**entry.resolve(params, where=name))
