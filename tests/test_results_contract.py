"""The subscriber contract (docs/results.md) against real outputs: a running pipeline (separate
worker processes, tiny models, a real redis-server) answers frames published by the Python
client, the CLI (`publish --meta @file`) and the gateway's /identify, one of them an image that
cannot be decoded; every result must validate against docs/results.schema.json, and the stream,
the pub/sub channel, the result key, a webhook (a local HTTP receiver), MQTT (a real mosquitto)
and GET /results/events must carry the same JSON, with the drone telemetry of docs/results.md
back unchanged in ``meta``. Bad ``meta`` is refused with a clear error and publishes nothing."""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from spotline.common.codec import decode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope, Result
from spotline.common.errors import InputError
from spotline.common.settings import Settings, load_settings, settings_env
from spotline.common.topology import FRAMES
from spotline.common.transport import DATA_FIELD, Transport
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from spotline.producer.sinks import MqttTarget, Sink, SinkOptions, WebhookTarget
from tests import test_sinks
from tests.conftest import ROOT, uvicorn_gateway
from tests.faultlib import encode_png, small_frame, wait_for
from tests.test_results_sse import read_events
from tests.test_sinks import KEYS, Receiver, Subscriber, run_in_thread

DOC = ROOT / "docs" / "results.md"
SCHEMA = json.loads((ROOT / "docs" / "results.schema.json").read_text())
# the sink tests' fixtures: a webhook receiver on 127.0.0.1 and a real mosquitto broker
receiver = test_sinks.receiver
mosquitto = test_sinks.mosquitto


def doc_json_block(marker: str) -> Any:
    """The first ```json block of docs/results.md holding ``marker``, parsed."""
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)
    return json.loads(next(b for b in blocks if marker in b))


TELEMETRY = doc_json_block('"misb0601"')  # the documented drone telemetry


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with no room for undocumented fields: every field a result has is in it."""
    s = copy.deepcopy(schema)
    s["additionalProperties"] = False
    s["properties"]["results"]["items"]["additionalProperties"] = False
    return s


VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
STRICT = jsonschema.Draft202012Validator(strict(SCHEMA))


def check(doc: dict[str, Any]) -> None:
    VALIDATOR.validate(doc)
    STRICT.validate(doc)


def as_sent(result: Result) -> dict[str, Any]:
    """A result's JSON as it goes over the wire and is parsed again."""
    return json.loads(json.dumps(result.as_json(), allow_nan=False))


@pytest.fixture(scope="module")
def pipeline(redis_server: EmbeddedRedis, data_dir: Path) -> Iterator[tuple[Settings, str]]:
    from spotline.pipeline.supervisor import LocalPipeline

    s = load_settings(env={}, namespace=f"rc{uuid.uuid4().hex[:8]}", data_dir=str(data_dir),
                      redis_url=redis_server.url).replace(imgsz=320, warmup=0, tta=False)
    with LocalPipeline(s, ready_timeout=300) as url:
        yield s, url


class PubSub:
    """Every message of the results channel, from a real subscription."""

    def __init__(self, t: Transport) -> None:
        self.ps = t.r.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(t.keys.channel)
        self.got: dict[str, Result] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.ps.get_message(timeout=0.2)
            if msg is not None:
                result = decode(msg["data"])
                assert isinstance(result, Result)
                self.got[result.frame_id] = result

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.ps.close()


class Events:
    """GET /results/events read by a plain client in a thread."""

    def __init__(self, base: str, n: int) -> None:
        self.got: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, args=(base, n), daemon=True)
        self.thread.start()

    def _run(self, base: str, n: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http, \
                http.stream("GET", "/results/events?start=all") as resp:
            lines = resp.iter_lines()
            for _ in range(n):
                self.got += read_events(lines, 1)


def undecodable_png() -> bytes:
    """A PNG whose header reads (the producer takes it) but whose data stops half way: detect
    cannot decode it, and the frame gets an error result."""
    img = cv2.imdecode(np.frombuffer(small_frame(3), np.uint8), cv2.IMREAD_COLOR)
    png = encode_png(img)
    return png[:len(png) // 2]


def test_every_surface_carries_the_same_json_with_the_meta_unchanged(
        pipeline: tuple[Settings, str], receiver: tuple[Receiver, str], mosquitto: int,
        tmp_path: Path) -> None:
    from spotline.cli import cli as spotline_cli

    s, url = pipeline
    rec, hook_url = receiver
    client = Client.connect(url, s)
    t = client.t
    pubsub = PubSub(t)
    sub = Subscriber(mosquitto)
    hook = Sink(Transport(s, url=url), WebhookTarget(hook_url, KEYS, timeout_s=10),
                SinkOptions(name=f"rc-hook-{uuid.uuid4().hex[:6]}", backoff_s=0.05))
    mqtt = Sink(Transport(s, url=url), MqttTarget(f"mqtt://127.0.0.1:{mosquitto}",
                                                  client_id=f"rc-{uuid.uuid4().hex[:6]}"),
                SinkOptions(name=f"rc-mqtt-{uuid.uuid4().hex[:6]}", backoff_s=0.05))
    threads = [run_in_thread(hook), run_in_thread(mqtt)]
    telemetry_file = tmp_path / "telemetry.json"
    telemetry_file.write_text(json.dumps(TELEMETRY))
    image = tmp_path / "frame.jpg"
    image.write_bytes(small_frame(5))
    start = t.last_id(t.keys.results)
    try:
        with uvicorn_gateway(s, url) as (base, _):
            events = Events(base, 5)
            wanted = {
                client.publish(small_frame(1), ["grey missile"], source_id="drone-7",
                               meta=TELEMETRY): TELEMETRY,
                client.publish(small_frame(2), ["red car", "white van"],
                               source_id="cam-plain"): {},
                client.publish(undecodable_png(), ["anything"], source_id="drone-7",
                               meta={"seq": 3}): {"seq": 3},
            }
            cli = CliRunner().invoke(
                spotline_cli,
                ["publish", str(image), "-c", "yellow helicopter", "--source-id", "cli-cam",
                 "--meta", f"@{telemetry_file}", "--no-progress"],
                env={**settings_env(s), "SPOTLINE_REDIS_URL": url}, catch_exceptions=False)
            assert cli.exit_code == 0, cli.output
            with httpx.Client(base_url=base, timeout=120) as http:
                answer = http.post("/identify", json={
                    "instances": [{"key": 0, "caption": "grey missile",
                                   "b64": base64.b64encode(small_frame(6)).decode()}],
                    "meta": {"job": 7, "tags": ["a", "b"]}})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["predictions"][0]) == 4
            stream = {r.frame_id: (i, r) for i, r in client.read_results(start)}
            by_source = {r.source_id: fid for fid, (_i, r) in stream.items()}
            wanted[by_source["cli-cam"]] = TELEMETRY
            wanted[by_source["http"]] = {"job": 7, "tags": ["a", "b"]}
            assert len(stream) == 5
            wait_for(lambda: len(events.got) == 5, 60, "every event over SSE")
            wait_for(lambda: set(wanted) <= rec.frames() and set(wanted) <= sub.frames()
                     and set(wanted) <= set(pubsub.got), 60, "every result in every sink")
    finally:
        for sink in (hook, mqtt):
            sink.stop()
        for th in threads:
            th.join(10)
        pubsub.close()
        sub.close()
    sse = {e["data"]["frame_id"]: e for e in events.got}
    mqtt_docs = {doc["frame_id"]: doc for _topic, doc in sub.messages}
    for fid, meta in wanted.items():
        entry_id, result = stream[fid]
        doc = as_sent(result)
        check(doc)
        assert doc["schema"] == "spotline.result/v1"
        assert doc["meta"] == meta, "meta comes back unchanged"
        stored = client.get_result(fid)
        assert stored is not None
        same = {"result key": as_sent(stored), "pub/sub": as_sent(pubsub.got[fid]),
                "webhook": rec.accepted[fid][0], "mqtt": mqtt_docs[fid],
                "sse": sse[fid]["data"]}
        for where, other in same.items():
            assert other == doc, f"{where} differs from the stream"
        assert sse[fid]["id"] == entry_id
    errors = [as_sent(r) for _i, r in stream.values() if r.error]
    assert len(errors) == 1 and errors[0]["meta"] == {"seq": 3}
    assert errors[0]["fallback"] is True and "cannot decode" in errors[0]["error"]
    assert all(item["score"] is None for item in errors[0]["results"])
    client.close()


def test_a_track_mode_result_follows_the_schema() -> None:
    """Track mode's fields: a track id per caption, and "not in view" as a null bbox."""
    result = Result(frame_id="f1", source_id="drone-7", capture_time=1.0,
                    captions=("grey aircraft", "red car"),
                    boxes=((10.0, 20.0, 30.0, 40.0), (0.0, 0.0, 0.0, 0.0)),
                    scores=(0.91, 0.03), image_size=(640, 480), track_ids=(4, -1),
                    absent=(False, True), meta=TELEMETRY, finished_time=1.2)
    doc = as_sent(result)
    check(doc)
    assert doc["results"][0]["track_id"] == 4 and doc["results"][1]["bbox"] is None


def test_the_schema_and_the_page_document_every_field() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    page = DOC.read_text()
    fields = [*SCHEMA["properties"],
              *(f"results[].{k}" for k in SCHEMA["properties"]["results"]["items"]["properties"])]
    missing = [f for f in fields if f"| `{f}` |" not in page]
    assert not missing, f"docs/results.md's table lacks {missing}"
    assert "additive" in page and "spotline.result/v1" in page


# --- bad meta: a clear error, nothing published ---------------------------------------------
BAD_META: list[tuple[Any, str]] = [
    ([1, 2], "meta must be a JSON object, got an array"),
    ("lat=1", "meta must be a JSON object, got a string"),
    ({"lat": float("nan")}, "meta.lat: nan is not a JSON number"),
    ({"when": object()}, "is not JSON-serialisable"),
    ({1: "x"}, "key 1 is not a string"),
    ({"big": "x" * 5000}, "at most 4096 (meta_max_bytes)"),
    ({"n": 2**70}, "outside 64 bits"),
]


def test_client_refuses_bad_meta_and_publishes_nothing(transport: Transport,
                                                       settings: Settings) -> None:
    client = Client(transport)
    for meta, message in BAD_META:
        with pytest.raises(InputError, match=re.escape(message)):
            client.publish(small_frame(1), ["x"], meta=meta)
    assert transport.length(transport.keys.inbox(FRAMES)) == 0
    fid = client.publish(small_frame(1), ["x"], meta={"ok": [1.5, None, {"deep": True}]})
    (_id, fields), = transport.entries(transport.keys.inbox(FRAMES))
    env = decode(fields[DATA_FIELD])
    assert isinstance(env, Envelope) and env.frame_id == fid
    assert env.meta == {"ok": [1.5, None, {"deep": True}]}


def test_cli_meta_errors_are_clear_and_publish_nothing(redis_server: EmbeddedRedis,
                                                       settings: Settings,
                                                       transport: Transport,
                                                       tmp_path: Path) -> None:
    from spotline.cli import cli

    image = tmp_path / "f.jpg"
    image.write_bytes(small_frame(2))
    env = {**settings_env(settings), "SPOTLINE_REDIS_URL": redis_server.url}
    for meta, message in (("[1]", "meta must be a JSON object"),
                          ("{lat: 1}", "meta is not valid JSON"),
                          (f"@{tmp_path / 'missing.json'}", "cannot read"),
                          (json.dumps({"x": "y" * 5000}), "meta_max_bytes")):
        result = CliRunner().invoke(cli, ["publish", str(image), "-c", "x", "--meta", meta,
                                          "--no-progress"], env=env)
        assert result.exit_code == 2 and message in result.output, result.output
    assert transport.length(transport.keys.inbox(FRAMES)) == 0


def test_gateway_meta_errors_are_400_and_publish_nothing(redis_server: EmbeddedRedis,
                                                         settings: Settings,
                                                         transport: Transport) -> None:
    client = Client.connect(redis_server.url, settings)
    b64 = base64.b64encode(small_frame(3)).decode()
    try:
        with TestClient(create_app(settings, client, timeout_s=1),
                        base_url="http://127.0.0.1") as http:
            for meta, message in (([1], "meta"), ("x", "meta"),
                                  ({"big": "x" * 5000}, "meta_max_bytes")):
                resp = http.post("/identify", json={
                    "instances": [{"key": 0, "caption": "x", "b64": b64}], "meta": meta})
                assert resp.status_code == 400 and message in resp.json()["error"], resp.text
    finally:
        client.close()
    assert transport.length(transport.keys.inbox(FRAMES)) == 0
