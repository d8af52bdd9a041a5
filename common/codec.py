"""The payload codec: the only place that knows msgpack. Never pickle.

numpy arrays travel as a msgpack ExtType (code 1): ``dtype-length, dtype, ndim, shape…, raw``
and decode zero-copy with ``np.frombuffer`` (the array is a read-only view of the payload).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import numpy as np

from .envelope import SCHEMA_VERSION, Envelope, Result
from .errors import DecodeError

NDARRAY_EXT = 1
# dtypes that may travel; anything else (object arrays above all) is refused both ways.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("u1", "i1", "u2", "i2", "i4", "i8", "u4", "f2", "f4", "f8", "?")
)
MAX_NDIM = 8

_KINDS: dict[str, type] = {"envelope": Envelope, "result": Result}
_TYPE_OF = {Envelope: "envelope", Result: "result"}
_FIELDS = {kind: {f.name for f in dataclasses.fields(cls)} for kind, cls in _KINDS.items()}


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    arr = np.ascontiguousarray(arr)
    dtype = arr.dtype.str.encode()
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {arr.dtype} cannot travel")
    header = struct.pack(f"<B{len(dtype)}sB{arr.ndim}I", len(dtype), dtype, arr.ndim, *arr.shape)
    return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes())


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_array(data: bytes) -> np.ndarray:
    try:
        (dlen,) = struct.unpack_from("<B", data, 0)
        dtype = data[1:1 + dlen].decode("ascii")
        (ndim,) = struct.unpack_from("<B", data, 1 + dlen)
        if ndim > MAX_NDIM:
            raise ValueError(f"{ndim} dimensions")
        shape = struct.unpack_from(f"<{ndim}I", data, 2 + dlen)
        offset = 2 + dlen + 4 * ndim
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"bad array header: {exc}") from None
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r} not allowed")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) - offset != expected:
        raise ValueError(f"array of shape {shape} {dtype} needs {expected} bytes, "
                         f"has {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        raise ValueError(f"unknown ext type {code}")
    return _unpack_array(data)


def encode(msg: Envelope | Result) -> bytes:
    """Envelope or Result → bytes."""
    kind = _TYPE_OF.get(type(msg))
    if kind is None:
        raise TypeError(f"cannot encode {type(msg).__name__}")
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return msgpack.packb([kind, body], default=_default, use_bin_type=True)


def decode(raw: bytes, max_bytes: int | None = None) -> Envelope | Result:
    """bytes → Envelope or Result; anything wrong raises DecodeError carrying ``raw``."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DecodeError(f"payload is {type(raw).__name__}, not bytes", None)
    raw = bytes(raw)
    if max_bytes is not None and len(raw) > max_bytes:
        raise DecodeError(f"payload of {len(raw)} bytes is over the {max_bytes}-byte limit", raw)
    try:
        obj = msgpack.unpackb(raw, ext_hook=_ext_hook, use_list=False, raw=False,
                              strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage: all become DecodeError
        raise DecodeError(f"not a spotline payload: {type(exc).__name__}: {exc}", raw) from None
    return _build(obj, raw)


def encode_state(state: dict[str, Any]) -> bytes:
    """A stage's state kept in Redis between frames (a source's tracker and evidence) → bytes.
    Plain values only: str, int, float, bool, None, lists, str-keyed dicts, numpy arrays."""
    if not isinstance(state, dict):
        raise TypeError(f"a state is a dict, not {type(state).__name__}")
    return msgpack.packb(state, default=_default, use_bin_type=True)


def decode_state(raw: bytes) -> dict[str, Any]:
    """bytes of ``encode_state`` → the state dict (arrays are read-only views); DecodeError
    for anything else."""
    try:
        obj = msgpack.unpackb(raw, ext_hook=_ext_hook, use_list=True, raw=False,
                              strict_map_key=True)
    except Exception as exc:  # as in decode: every msgpack failure is a DecodeError
        raise DecodeError(f"not a spotline state: {type(exc).__name__}: {exc}",
                          bytes(raw)) from None
    if not isinstance(obj, dict):
        raise DecodeError(f"not a spotline state: a {type(obj).__name__}", bytes(raw))
    return obj


def split_strings(raw: bytes) -> list[bytes]:
    """bytes of a msgpack array of strings (a Redis script's ``cmsgpack.pack`` of a reply's
    values, as common/trackmemory.py reads a memory in a few replies instead of one a record)
    -> the strings as bytes; DecodeError for anything else."""
    try:
        obj = msgpack.unpackb(raw, raw=True, use_list=True)
    except Exception as exc:
        raise DecodeError(f"not a packed list: {type(exc).__name__}: {exc}", bytes(raw)) from None
    if not isinstance(obj, list):
        raise DecodeError(f"not a packed list: a {type(obj).__name__}", bytes(raw))
    return [v for v in obj if isinstance(v, bytes)]


def _build(obj: Any, raw: bytes) -> Envelope | Result:
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] in _KINDS
            and isinstance(obj[1], dict)):
        raise DecodeError("not a spotline payload: expected [kind, fields]", raw)
    kind, body = obj
    if isinstance(body.get("meta"), dict):  # JSON arrays in meta come back as lists, as given
        body = {**body, "meta": _thaw(body["meta"])}
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"schema version {version!r} is not {SCHEMA_VERSION}", raw)
    unknown = set(body) - _FIELDS[kind]
    if unknown:
        raise DecodeError(f"unknown fields {sorted(unknown)} in {kind}", raw)
    if not isinstance(body.get("frame_id"), str):
        raise DecodeError(f"{kind} has no frame_id", raw)
    try:
        msg = _KINDS[kind](**body)
    except TypeError as exc:
        raise DecodeError(f"malformed {kind}: {exc}", raw) from None
    _check_types(msg, raw)
    return msg


def _thaw(v: Any) -> Any:
    """msgpack's tuples (use_list=False) back to lists, inside a frame's meta."""
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, dict):
        return {k: _thaw(x) for k, x in v.items()}
    return v


def _is_json(v: Any, depth: int = 0) -> bool:
    """A JSON value: what a frame's meta may hold (common/meta.py checks it at publish)."""
    if depth > 32:
        return False
    if v is None or isinstance(v, bool | int | str):
        return True
    if isinstance(v, float):
        return v == v and v not in (float("inf"), float("-inf"))
    if isinstance(v, list):
        return all(_is_json(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json(x, depth + 1) for k, x in v.items())
    return False


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_trace(v: Any) -> bool:
    return isinstance(v, tuple) and all(
        isinstance(row, tuple) and len(row) == 4 and isinstance(row[0], str)
        and all(_is_num(t) for t in row[1:]) for row in v)


def _is_array(v: Any, ndim: int | None = None, optional: bool = True) -> bool:
    if v is None:
        return optional
    return isinstance(v, np.ndarray) and (ndim is None or v.ndim == ndim)


# Checks shared by envelopes and results: every one a plain predicate on the field's value, so a
# lying value (a 0-d array where a tuple belongs, a str for a time) is refused here and nothing
# past decode meets a type it does not expect.
_COMMON_CHECKS: dict[str, Any] = {
    "source_id": lambda v: isinstance(v, str),
    "capture_time": _is_num,
    "captions": lambda v: isinstance(v, tuple) and all(isinstance(c, str) for c in v),
    "image_size": lambda v: (isinstance(v, tuple) and len(v) == 2
                             and all(_is_int(n) and n >= 0 for n in v)),
    "error": lambda v: v is None or isinstance(v, str),
    "trace": _is_trace,
    "meta": lambda v: isinstance(v, dict) and _is_json(v),
}
_ENVELOPE_CHECKS: dict[str, Any] = {
    "image": lambda v: v is None or isinstance(v, bytes),
    # xyxy rows, one score per box, captions × boxes: the shapes stages index by.
    "boxes": lambda v: _is_array(v, 2) and (v is None or v.shape[1] == 4),
    "det_scores": lambda v: _is_array(v, 1),
    "scores": lambda v: _is_array(v, 2),
    # each crop's shape and dtype are the stages' to judge (check_crops answers the frame with
    # an error naming the crop); here only that crops is a tuple of arrays.
    "crops": lambda v: isinstance(v, tuple) and all(isinstance(c, np.ndarray) for c in v),
    "part": _is_int,
    "nparts": _is_int,
    # track mode: the frame's number in its source; per box its track, per caption its box
    "seq": _is_int,
    "track_ids": lambda v: _is_array(v, 1) and (v is None or v.dtype.kind == "i"),
    "picks": lambda v: _is_array(v, 1) and (v is None or v.dtype.kind == "i"),
    "probs": lambda v: _is_array(v, 1) and (v is None or v.dtype.kind == "f"),
}
_RESULT_CHECKS: dict[str, Any] = {
    "boxes": lambda v: isinstance(v, tuple) and all(
        isinstance(b, tuple) and len(b) == 4 and all(_is_num(x) for x in b) for b in v),
    "scores": lambda v: isinstance(v, tuple) and all(_is_num(x) for x in v),
    "fallback": lambda v: isinstance(v, bool),
    "finished_time": _is_num,
    "track_ids": lambda v: isinstance(v, tuple) and all(_is_int(t) for t in v),
    "absent": lambda v: isinstance(v, tuple) and all(isinstance(a, bool) for a in v),
}


def _check_types(msg: Envelope | Result, raw: bytes) -> None:
    """Reject payloads whose fields have the wrong types or shapes, so stages can trust them."""
    def bad(name: str) -> DecodeError:
        return DecodeError(f"field {name!r} has the wrong type or shape", raw)

    extra = _ENVELOPE_CHECKS if isinstance(msg, Envelope) else _RESULT_CHECKS
    for name, ok in (*_COMMON_CHECKS.items(), *extra.items()):
        if not ok(getattr(msg, name)):
            raise bad(name)
    if isinstance(msg, Envelope):
        if not 0 <= msg.part < msg.nparts:
            raise bad("part")
        if (msg.boxes is not None and msg.det_scores is not None
                and len(msg.det_scores) != len(msg.boxes)):
            raise bad("det_scores")
        wrong = _track_lengths(msg)
        if wrong:
            raise bad(wrong)
    elif not len(msg.boxes) == len(msg.scores) == len(msg.captions):
        raise bad("boxes")
    elif any(v and len(v) != len(msg.captions) for v in (msg.track_ids, msg.absent)):
        raise bad("track_ids" if len(msg.track_ids) not in (0, len(msg.captions)) else "absent")


def _track_lengths(env: Envelope) -> str | None:
    """The track-mode field whose length does not fit the frame (one per box, one per
    caption), if any."""
    if env.track_ids is not None and (env.boxes is None or len(env.track_ids) != len(env.boxes)):
        return "track_ids"
    for name in ("picks", "probs"):
        value = getattr(env, name)
        if value is not None and len(value) != len(env.captions):
            return name
    return None
