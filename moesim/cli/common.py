"""Helpers more than one command shares: ``--set KEY=VALUE`` items, and flags that must be at least 1.

Each raises :class:`~moesim.errors.InputError` naming the flag, so bad input is one line and exit status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from moesim.errors import InputError


def key_values(items: list[str] | None) -> Iterator[tuple[str, Any]]:
    """``--set KEY=VALUE`` items as (KEY, VALUE read as YAML) pairs, one at a time in the order given."""
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set needs KEY=VALUE, got {item!r}")
        yield key, yaml.safe_load(value)


def at_least_one(value: int | None, flag: str) -> None:
    """An optional integer flag, when given, must be >= 1."""
    if value is not None and value < 1:
        raise InputError(f"must be >= 1, got {value}", field=flag)
