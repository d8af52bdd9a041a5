import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spotline.common.codec import _default, decode, encode
from spotline.common.envelope import SCHEMA_VERSION, Envelope, Result
from spotline.common.errors import DecodeError
from tests.hypo import examples

text = st.text(max_size=40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
crops = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=12))
boxes = st.integers(0, 6).flatmap(lambda n: hnp.arrays(np.float32, (n, 4)))
trace = st.tuples(text, floats, floats, floats)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    nparts = draw(st.integers(1, 5))
    box_rows = draw(st.none() | boxes)
    return Envelope(
        frame_id=draw(text), source_id=draw(text), capture_time=draw(floats),
        captions=tuple(draw(st.lists(text, max_size=4))),
        image_size=(draw(st.integers(0, 10**5)), draw(st.integers(0, 10**5))),
        image=draw(st.none() | st.binary(max_size=200)), boxes=box_rows,
        det_scores=draw(st.none() | hnp.arrays(np.float32, st.integers(0, 5) if box_rows is None
                                               else len(box_rows))),
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


@settings(max_examples=examples(150))
@given(envelopes())
def test_envelope_round_trip(env: Envelope) -> None:
    assert decode(encode(env)) == env


@settings(max_examples=examples(150))
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


@settings(max_examples=examples(300))
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


@settings(max_examples=examples(300))
@given(st.sampled_from(["envelope", "result", "x"]), st.dictionaries(
    st.sampled_from(["frame_id", "v", "captions", "image", "boxes", "part", "nparts", "crops",
                     "scores", "trace", "image_size", "source_id", "error"]), json_like))
def test_arbitrary_msgpack_only_typed_errors(kind: str, body: dict) -> None:
    try:
        msg = decode(msgpack.packb([kind, body], use_bin_type=True))
    except DecodeError:
        return
    use_downstream(msg)


# --- every field checked: whatever decodes, the code past decode can use ------------------------
ZERO_D = msgpack.ExtType(1, b"\x03<u2\x00\x00\x00")  # a 0-d uint16 array (found by hypothesis)
ENVELOPE_FIELDS = ["source_id", "capture_time", "captions", "image_size", "image", "boxes",
                   "det_scores", "crops", "part", "nparts", "scores", "trace", "error"]
RESULT_FIELDS = ["source_id", "capture_time", "captions", "boxes", "scores", "image_size",
                 "fallback", "error", "trace", "finished_time"]
WRONG = [ZERO_D, "str", 1.5, True, -1, [ZERO_D], [["a", 1, 2]], {"k": 1}, b"\x00"]


def _wrong_cases() -> list[tuple[str, str, object]]:
    fine = {  # values of the wrong kind that are nevertheless valid for the field
        ("envelope", "image"): [b"\x00"], ("envelope", "error"): ["str"],
        ("envelope", "source_id"): ["str"], ("envelope", "capture_time"): [1.5, -1],
        ("envelope", "crops"): [[ZERO_D]],  # any array: check_crops answers bad ones
        ("result", "error"): ["str"], ("result", "source_id"): ["str"],
        ("result", "capture_time"): [1.5, -1], ("result", "finished_time"): [1.5, -1],
        ("result", "fallback"): [True]}
    out = []
    for kind, fields in (("envelope", ENVELOPE_FIELDS), ("result", RESULT_FIELDS)):
        for name in fields:
            out += [(kind, name, v) for v in WRONG if not any(
                v is ok or (type(v) is type(ok) and v == ok) for ok in fine.get((kind, name), []))]
    return out


def _base(kind: str) -> dict:
    if kind == "envelope":
        return {"frame_id": "x", "v": SCHEMA_VERSION}
    return {"frame_id": "x", "v": SCHEMA_VERSION, "source_id": "s", "capture_time": 0.0,
            "captions": (), "boxes": (), "scores": ()}


@pytest.mark.parametrize("kind, name, value", _wrong_cases())
def test_every_field_of_the_wrong_type_is_a_decode_error(kind: str, name: str,
                                                         value: object) -> None:
    raw = msgpack.packb([kind, {**_base(kind), name: value}], use_bin_type=True)
    with pytest.raises(DecodeError, match=f"field '{name}'|part|det_scores|boxes"):
        decode(raw)


@pytest.mark.parametrize("body, field", [
    ({"boxes": np.zeros((2, 4), np.float32), "det_scores": np.zeros(3, np.float32)},
     "det_scores"),
    ({"boxes": np.zeros((2, 3), np.float32)}, "boxes"),
    ({"scores": np.zeros(3, np.float32)}, "scores"),
    ({"part": 2, "nparts": 2}, "part"),
    ({"trace": (("detect", 1.0, 2.0),)}, "trace"),
    ({"image_size": (3, -1)}, "image_size"),
])
def test_wrong_shapes_are_decode_errors(body: dict, field: str) -> None:
    raw = msgpack.packb(["envelope", {**_base("envelope"), **body}], default=_default,
                        use_bin_type=True)
    with pytest.raises(DecodeError, match=field):
        decode(raw)


def test_result_boxes_and_scores_match_captions() -> None:
    raw = msgpack.packb(["result", {**_base("result"), "captions": ["a"]}], use_bin_type=True)
    with pytest.raises(DecodeError, match="boxes"):
        decode(raw)


def use_downstream(msg: Envelope | Result) -> None:
    """What the stages and the collector do with a decoded message, none of which may raise
    anything but the InputError a stage answers the frame with."""
    import json

    from spotline.common.envelope import error_result
    from spotline.common.errors import InputError
    from spotline.common.settings import Settings
    from spotline.stages.base import check_crops
    from spotline.stages.collect import frame_result
    if isinstance(msg, Result):
        json.dumps(msg.as_json())
        assert msg.capture_time > 0 or msg.capture_time <= 0
        return
    error_result(msg, "reason").as_json()
    try:
        check_crops(msg)
    except InputError:
        pass
    json.dumps(frame_result(msg, Settings()).as_json())


FIELD_VALUES = json_like | st.builds(lambda: ZERO_D) | st.lists(st.builds(lambda: ZERO_D),
                                                                max_size=2)


@settings(max_examples=examples(300))
@given(st.sampled_from(["envelope", "result"]),
       st.dictionaries(st.sampled_from(ENVELOPE_FIELDS + RESULT_FIELDS), FIELD_VALUES))
@example("envelope", {"captions": ZERO_D})
@example("envelope", {"crops": ZERO_D})
@example("envelope", {"trace": ZERO_D})
@example("envelope", {"capture_time": "2024"})
@example("result", {"capture_time": "2024", "captions": (), "boxes": (), "scores": ()})
def test_whatever_decodes_is_usable_downstream(kind: str, body: dict) -> None:
    body = {k: v for k, v in body.items() if kind == "envelope" and k in ENVELOPE_FIELDS
            or kind == "result" and k in RESULT_FIELDS}
    try:
        msg = decode(msgpack.packb([kind, {**_base(kind), **body}], use_bin_type=True))
    except DecodeError:
        return
    use_downstream(msg)
