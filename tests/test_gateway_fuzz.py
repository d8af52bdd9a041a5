"""Property-based: arbitrary bytes and JSON at the HTTP gateway, arbitrary arrays at the codec.
The gateway answers 200 or a 4xx/5xx JSON error with an "error" key, never an unhandled
exception; the codec raises DecodeError, nothing else."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from spotline.common.codec import NDARRAY_EXT, decode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.errors import DecodeError
from spotline.common.settings import load_settings
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from tests.faultlib import small_frame
from tests.hypo import examples

FUZZ = settings(max_examples=examples(150),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
VALID_B64 = base64.b64encode(small_frame(5, 64, 48)).decode()
JSON = {"content-type": "application/json"}  # the gateway refuses any other (415)


@pytest.fixture(scope="module")
def http(redis_server: EmbeddedRedis) -> Iterator[TestClient]:
    """The gateway over a namespace with no workers: a valid request times out (504) fast."""
    s = load_settings(env={}, namespace=f"fuzz{uuid.uuid4().hex[:8]}", max_frame_bytes=20_000,
                      max_captions=4, max_caption_chars=40)
    app = create_app(s, Client.connect(redis_server.url, s), timeout_s=0.05)
    # raise_server_exceptions: an exception that escaped the handlers fails the test.
    with TestClient(app, raise_server_exceptions=True, base_url="http://127.0.0.1") as client:
        yield client


def check(resp: Any, n_instances: int | None = None) -> None:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    event(f"HTTP {resp.status_code}")  # --hypothesis-show-statistics shows the mix
    body = resp.json()
    if resp.status_code == 200:
        assert isinstance(body["predictions"], list)
        if n_instances is not None:
            assert len(body["predictions"]) == n_instances
        return
    assert 400 <= resp.status_code < 600, resp.status_code
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=15)
b64s = (st.sampled_from([VALID_B64, "", "not base64!!", "AAAA", VALID_B64[:-7],
                         base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode(),
                         base64.b64encode(b"x" * 30_000).decode()])
        | st.text(max_size=40) | json_values)
captions = (st.sampled_from(["red car", "", "   ", "x" * 41, "ok \ud800"]) | st.text(max_size=50)
            | json_values)
keys = st.integers() | st.text(max_size=8) | json_values
instances = st.fixed_dictionaries({"key": keys, "caption": captions, "b64": b64s},
                                  optional={"extra": json_values})
requests_ = st.fixed_dictionaries({"instances": st.lists(instances | json_values, max_size=4)},
                                  optional={"other": json_values})


@FUZZ
@given(body=st.binary(max_size=2000))
def test_arbitrary_bytes(http: TestClient, body: bytes) -> None:
    check(http.post("/identify", content=body, headers={"content-type": "application/json"}))


@FUZZ
@given(doc=json_values)
def test_arbitrary_json(http: TestClient, doc: Any) -> None:
    check(http.post("/identify", content=json.dumps(doc), headers=JSON))


@FUZZ
@given(doc=requests_)
def test_request_shaped_json(http: TestClient, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, ensure_ascii=True)  # lone surrogates travel as \ud800 escapes
    check(http.post("/identify", content=text, headers=JSON), len(doc["instances"]))


def test_a_valid_request_without_workers_is_a_504(http: TestClient) -> None:
    resp = http.post("/identify", json={"instances": [
        {"key": 0, "caption": "red car", "b64": VALID_B64}]})
    assert resp.status_code == 504 and "did not answer" in resp.json()["error"]


def test_an_oversized_body_is_a_413(http: TestClient) -> None:
    resp = http.post("/identify", content=b"{" + b" " * 2_000_000 + b"}", headers=JSON)
    assert resp.status_code == 413 and "limit" in resp.json()["error"]


# --- the codec: arrays whose headers lie --------------------------------------------------------
dtypes = st.sampled_from(["<f4", "|u1", "<u2", "<i8", "|O", "<c8", ">f4", "", "xx", "<f4\0"])


@st.composite
def array_exts(draw: st.DrawFn) -> msgpack.ExtType:
    dtype = draw(dtypes).encode()
    shape = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), max_size=9))
    header = struct.pack(f"<B{len(dtype)}sB{len(shape)}I", len(dtype), dtype, len(shape),
                         *shape)
    cut = draw(st.integers(0, len(header)))
    body = header[:cut] if draw(st.booleans()) else header + draw(st.binary(max_size=64))
    code = draw(st.sampled_from([NDARRAY_EXT, NDARRAY_EXT, 0, 7, 127]))
    return msgpack.ExtType(code, body)


ZERO_D_U2 = msgpack.ExtType(1, b"\x03<u2\x00\x00\x00")  # a 0-d array: hypothesis found these


@settings(max_examples=examples(400))
@given(field=st.sampled_from(["boxes", "det_scores", "scores", "crops", "image", "captions",
                              "trace", "image_size", "source_id", "capture_time", "error",
                              "part", "nparts"]),
       value=array_exts() | st.lists(array_exts(), max_size=3))
@example(field="captions", value=ZERO_D_U2)
@example(field="crops", value=ZERO_D_U2)
@example(field="trace", value=ZERO_D_U2)
@example(field="trace", value=[ZERO_D_U2])
@example(field="capture_time", value=ZERO_D_U2)
def test_codec_refuses_lying_arrays_with_decode_errors(field: str, value: Any) -> None:
    raw = msgpack.packb(["envelope", {"frame_id": "x", "v": 1, field: value}],
                        use_bin_type=True)
    try:
        decode(raw)
    except DecodeError:
        pass
