"""Exceptions a user can act on.

`ConfigError` names the offending field and, where there is a closed set, the allowed values.
The CLI turns it into a one-line message and exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """Invalid user input: ``field`` names the key, the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Picklable (raised in a worker process, re-raised in the parent)."""
        return type(self), (self.field, self.message)


def unknown_name(field: str, value: object, allowed: Iterable[str]) -> ConfigError:
    """A ConfigError for a value outside a closed set, listing the allowed values."""
    choices = ", ".join(sorted(allowed))
    return ConfigError(field, f"unknown value {value!r}; allowed: {choices}")
