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


def _build(obj: Any, raw: bytes) -> Envelope | Result:
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] in _KINDS
            and isinstance(obj[1], dict)):
        raise DecodeError("not a spotline payload: expected [kind, fields]", raw)
    kind, body = obj
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


def _check_types(msg: Envelope | Result, raw: bytes) -> None:
    """Reject payloads whose fields have the wrong types, so stages can trust them."""
    def bad(name: str) -> DecodeError:
        return DecodeError(f"field {name!r} has the wrong type", raw)

    if not all(isinstance(c, str) for c in msg.captions):
        raise bad("captions")
    if not (isinstance(msg.image_size, tuple) and len(msg.image_size) == 2):
        raise bad("image_size")
    if isinstance(msg, Envelope):
        if msg.image is not None and not isinstance(msg.image, bytes):
            raise bad("image")
        for name in ("boxes", "det_scores", "scores"):
            value = getattr(msg, name)
            if value is not None and not isinstance(value, np.ndarray):
                raise bad(name)
        if not all(isinstance(c, np.ndarray) for c in msg.crops):
            raise bad("crops")
        if not (isinstance(msg.part, int) and isinstance(msg.nparts, int)
                and 0 <= msg.part < msg.nparts):
            raise bad("part")
