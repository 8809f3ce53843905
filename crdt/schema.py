"""Checked readers for msgpack-decoded dicts: one place for the type rules of payloads."""

from __future__ import annotations

import math
from typing import Any


class SchemaError(ValueError):
    """A decoded payload does not match its schema."""


def as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{what} must be a map")
    return value


def get_str(d: dict[str, Any], name: str, max_chars: int = 256, *, allow_empty: bool = True) -> str:
    value = d.get(name)
    if not isinstance(value, str) or len(value) > max_chars or (not allow_empty and not value):
        raise SchemaError(f"{name} must be a string of at most {max_chars} characters")
    return value


def get_int(d: dict[str, Any], name: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    value = d.get(name)
    if type(value) is not int or not minimum <= value <= maximum:
        raise SchemaError(f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def get_float(
    d: dict[str, Any], name: str, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    value = d.get(name)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise SchemaError(f"{name} must be a finite number")
    if not minimum <= value <= maximum:
        raise SchemaError(f"{name} must be in [{minimum}, {maximum}]")
    return float(value)


def get_list(d: dict[str, Any], name: str, max_items: int) -> list[Any]:
    value = d.get(name)
    if not isinstance(value, list) or len(value) > max_items:
        raise SchemaError(f"{name} must be a list of at most {max_items} items")
    return value


def get_str_list(d: dict[str, Any], name: str, max_items: int, max_chars: int = 256) -> list[str]:
    items = get_list(d, name, max_items)
    if not all(isinstance(s, str) and len(s) <= max_chars for s in items):
        raise SchemaError(f"{name} must hold strings of at most {max_chars} characters")
    return items


def check_choice(value: str, name: str, choices: frozenset[str]) -> str:
    if value not in choices:
        raise SchemaError(f"{name} must be one of {sorted(choices)}")
    return value
