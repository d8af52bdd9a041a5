import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from spotline.common.codec import decode, encode
from spotline.common.envelope import SCHEMA_VERSION, Envelope, Result
from spotline.common.errors import DecodeError

text = st.text(max_size=40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
crops = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=12))
boxes = st.integers(0, 6).flatmap(lambda n: hnp.arrays(np.float32, (n, 4)))
trace = st.tuples(text, floats, floats, floats)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    nparts = draw(st.integers(1, 5))
    return Envelope(
        frame_id=draw(text), source_id=draw(text), capture_time=draw(floats),
        captions=tuple(draw(st.lists(text, max_size=4))),
        image_size=(draw(st.integers(0, 10**5)), draw(st.integers(0, 10**5))),
        image=draw(st.none() | st.binary(max_size=200)), boxes=draw(st.none() | boxes),
        det_scores=draw(st.none() | hnp.arrays(np.float32, st.integers(0, 5))),
        crops=tuple(draw(st.lists(crops, max_size=3))),
        part=draw(st.integers(0, nparts - 1)), nparts=nparts,
        scores=draw(st.none() | hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2,
                                                                       min_side=0))),
        trace=tuple(draw(st.lists(trace, max_size=4))), error=draw(st.none() | text))


@st.composite
def results(draw: st.DrawFn) -> Result:
    n = draw(st.integers(0, 4))
    box = st.tuples(floats, floats, floats, floats)
    return Result(
        frame_id=draw(text), source_id=draw(text), capture_time=draw(floats),
        captions=tuple(draw(st.lists(text, min_size=n, max_size=n))),
        boxes=tuple(draw(st.lists(box, min_size=n, max_size=n))),
        scores=tuple(draw(st.lists(st.floats(width=64), min_size=n, max_size=n))),
        image_size=(draw(st.integers(0, 9999)), draw(st.integers(0, 9999))),
        fallback=draw(st.booleans()), error=draw(st.none() | text),
        trace=tuple(draw(st.lists(trace, max_size=3))), finished_time=draw(floats))


@settings(max_examples=150, deadline=None)
@given(envelopes())
def test_envelope_round_trip(env: Envelope) -> None:
    assert decode(encode(env)) == env


@settings(max_examples=150, deadline=None)
@given(results())
def test_result_round_trip(res: Result) -> None:
    assert decode(encode(res)) == res


def test_arrays_decode_zero_copy() -> None:
    crop = np.arange(96 * 96 * 3, dtype=np.uint8).reshape(96, 96, 3)
    env = decode(encode(Envelope(frame_id="f", crops=(crop,), boxes=np.ones((1, 4), np.float32))))
    out = env.crops[0]
    assert np.array_equal(out, crop) and out.dtype == np.uint8
    assert not out.flags.owndata and not out.flags.writeable  # a view of the payload bytes


def test_non_contiguous_arrays_travel() -> None:
    arr = np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::2]
    assert np.array_equal(decode(encode(Envelope(frame_id="f", scores=arr))).scores, arr)


def test_object_arrays_refused() -> None:
    with pytest.raises(TypeError):
        encode(Envelope(frame_id="f", scores=np.array([object()])))


def _raw(body: dict, kind: str = "envelope") -> bytes:
    return msgpack.packb([kind, body], use_bin_type=True)


@pytest.mark.parametrize("raw, match", [
    (b"", "not a spotline payload"),
    (b"\xc1garbage", "not a spotline payload"),
    (msgpack.packb({"a": 1}), "expected"),
    (_raw({"frame_id": "x", "v": SCHEMA_VERSION + 1}), "schema version"),
    (_raw({"frame_id": "x"}), "schema version"),
    (_raw({"frame_id": "x", "v": SCHEMA_VERSION, "bogus": 1}), "unknown fields"),
    (_raw({"frame_id": 5, "v": SCHEMA_VERSION}), "frame_id"),
    (_raw({"frame_id": "x", "v": SCHEMA_VERSION, "captions": [1]}), "captions"),
    (_raw({"frame_id": "x", "v": SCHEMA_VERSION, "part": 3, "nparts": 2}), "part"),
    (_raw({"frame_id": "x", "v": SCHEMA_VERSION, "crops": ["no"]}), "crops"),
    (msgpack.packb(["envelope", {"frame_id": "x", "v": 1,
                                 "boxes": msgpack.ExtType(1, b"\x03<f4\x01\x05\x00\x00\x00")}]),
     "needs"),
    (msgpack.packb(["envelope", {"frame_id": "x", "v": 1,
                                 "boxes": msgpack.ExtType(1, b"\x03|O8\x01\x00\x00\x00\x00")}]),
     "not allowed"),
    (msgpack.packb(["envelope", {"frame_id": "x", "v": 1, "boxes": msgpack.ExtType(9, b"")}]),
     "ext type"),
])
def test_bad_payloads_are_typed_errors(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        decode(raw)
    assert info.value.raw == raw


def test_truncated_and_oversized() -> None:
    raw = encode(Envelope(frame_id="f", crops=(np.zeros((50, 50, 3), np.uint8),)))
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(DecodeError):
            decode(raw[:cut])
    with pytest.raises(DecodeError, match="limit"):
        decode(raw, max_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_typed_errors(raw: bytes) -> None:
    try:
        decode(raw)
    except DecodeError:
        pass


json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
                         | st.floats() | text
                         | st.binary(max_size=20),
                         lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                         max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["envelope", "result", "x"]), st.dictionaries(
    st.sampled_from(["frame_id", "v", "captions", "image", "boxes", "part", "nparts", "crops",
                     "scores", "trace", "image_size", "source_id", "error"]), json_like))
def test_arbitrary_msgpack_only_typed_errors(kind: str, body: dict) -> None:
    try:
        decode(msgpack.packb([kind, body], use_bin_type=True))
    except DecodeError:
        pass
