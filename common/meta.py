"""A frame's ``meta``: a small JSON object set at publish time (a drone's telemetry, a camera's
pose) that travels with the frame through every stage and comes back unchanged on its result.

``check_meta`` is the one check every producer runs (the client, the CLI, the gateway): the value
must be a JSON object (str keys; values null, booleans, numbers, strings, arrays and objects),
finite numbers only, integers within 64 bits, nesting at most ``MAX_DEPTH`` deep, and at most
``meta_max_bytes`` as compact UTF-8 JSON. Anything else is an InputError that says what is wrong,
and nothing is published.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InputError

MAX_DEPTH = 16
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries


def meta_bytes(meta: dict[str, Any]) -> int:
    """The size the cap applies to: compact UTF-8 JSON."""
    return len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8"))


def check_meta(meta: Any, max_bytes: int) -> dict[str, Any]:
    """The meta to publish ({} for None); InputError naming the problem otherwise."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InputError(f"meta must be a JSON object, got {_kind(meta)}")
    _check(meta, "meta", 0)
    size = meta_bytes(meta)
    if size > max_bytes:
        raise InputError(f"meta is {size} bytes as JSON; at most {max_bytes} (meta_max_bytes)")
    return meta


def parse_meta(text: str, max_bytes: int) -> dict[str, Any]:
    """Meta given as JSON text (the CLI, a file); InputError when it is not a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"meta is not valid JSON: {exc}") from None
    return check_meta(value, max_bytes)


def _kind(v: Any) -> str:
    names = {list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), f"a {type(v).__name__} (not JSON)")


def _check(v: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InputError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if v is None or isinstance(v, bool | str):
        return
    if isinstance(v, int):
        if not INT_MIN <= v <= INT_MAX:
            raise InputError(f"{path}: integer {v} is outside 64 bits")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InputError(f"{path}: {v} is not a JSON number")
        return
    if isinstance(v, list | tuple):
        for i, item in enumerate(v):
            _check(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(v, dict):
        for key, item in v.items():
            if not isinstance(key, str):
                raise InputError(f"{path}: key {key!r} is not a string")
            _check(item, f"{path}.{key}", depth + 1)
        return
    raise InputError(f"{path}: {_kind(v)} is not JSON-serialisable")
