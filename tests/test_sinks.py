"""Result sinks against real receivers: a local HTTP server (stdlib, in a thread) that fails on
purpose (503s, a reply slower than the sink's timeout, 500s for one source, a 400) and Debian's
mosquitto broker started on a free port. Results are written to the results stream the way the
collector writes them; every one must arrive, none lost when the sink process is SIGKILLed
mid-stream and started again."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from spotline.common.codec import encode
from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.envelope import Result
from spotline.common.settings import Settings
from spotline.common.transport import DATA_FIELD, FRAME_FIELD, Transport
from spotline.producer.sinks import (
    FRAME_HEADER,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    MqttTarget,
    SecretFile,
    Sink,
    SinkOptions,
    WebhookTarget,
    parse_secrets,
)
from tests.conftest import ROOT, child_env
from tests.faultlib import wait_for

SECRET = "whsec_" + base64.b64encode(b"spotline-test-secret-0123456789ab").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"spotline-rotated-secret-abcdefgh").decode()
KEYS = parse_secrets(SECRET, "test")


def docs_verifier() -> Any:
    """The receiver's verification function exactly as docs/results.md prints it (so the page
    cannot drift from what the sink sends)."""
    page = (ROOT / "docs" / "results.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    code = next(b for b in blocks if "def verify_webhook(" in b)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/results.md", "exec"), namespace)  # noqa: S102 - our own page
    return namespace["verify_webhook"]


verify_webhook = docs_verifier()
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)


# --- results, written as the collector writes them ---------------------------------------------
def make_result(i: int, source: str = "cam-a") -> Result:
    return Result(frame_id=f"frame{i:04d}", source_id=source, capture_time=1000.0 + i,
                  captions=("grey aircraft", "red car"),
                  boxes=((1.0 + i, 2.0, 30.0, 40.0), (0.0, 0.0, 0.0, 0.0)),
                  scores=(0.9, float("nan")), image_size=(640, 480), fallback=False,
                  finished_time=1001.0 + i)


def publish_results(t: Transport, results: list[Result]) -> None:
    for r in results:
        t.r.xadd(t.keys.results, {FRAME_FIELD: r.frame_id.encode(), DATA_FIELD: encode(r)})


# --- a webhook receiver that fails on purpose -------------------------------------------------
@dataclass
class Receiver:
    """Accepted bodies by frame id; ``plan(n, body)`` picks the answer of request n:
    an HTTP status, or "slow" (answer after the sink's timeout)."""

    plan: Any = None
    delay_s: float = 0.0  # per accepted request (so a sink can be killed mid-stream)
    accepted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    bad_signatures: int = 0
    secret: str = SECRET  # what the receiver verifies with (docs/results.md's function)
    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)  # accepted requests
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: bytes, headers: Any) -> int | str:
        with self.lock:
            self.requests += 1
            n = self.requests
        status = self.plan(n, json.loads(body)) if self.plan else 200
        if status == 200:
            if not verify_webhook(self.secret, dict(headers), body):
                self.bad_signatures += 1
                return 401
            doc = json.loads(body)
            assert headers[FRAME_HEADER] == doc["frame_id"] == headers[ID_HEADER]
            with self.lock:
                self.raw.append((dict(headers), body))
            time.sleep(self.delay_s)
            with self.lock:
                self.accepted.setdefault(doc["frame_id"], []).append(doc)
        return status

    def frames(self) -> set[str]:
        with self.lock:
            return set(self.accepted)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = rec.answer(body, self.headers)
            if status == "slow":
                time.sleep(1.0)  # the sink's timeout is 0.3 s: it gives up and retries
                status = 200  # ...but this one is never recorded as accepted
            try:
                self.send_response(int(status))
                self.end_headers()
                self.wfile.write(b"{}")
            except OSError:  # the sink hung up (its timeout)
                pass

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def run_in_thread(sink: Sink) -> threading.Thread:
    th = threading.Thread(target=sink.run, daemon=True)
    th.start()
    wait_for(lambda: group_exists(sink.t, sink.opts.group), 10, "the sink's group")
    return th


def group_exists(t: Transport, group: str) -> bool:
    try:
        return any(g["name"].decode() == group for g in t.r.xinfo_groups(t.keys.results))
    except Exception:
        return False


def pending(t: Transport, group: str) -> int:
    return int(t.r.xpending(t.keys.results, group)["pending"])


# --- webhook ----------------------------------------------------------------------------------
def test_webhook_delivers_every_result_signed_through_503s_and_a_timeout(
        transport: Transport, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    # every third request fails with 503; request 5 answers after the sink's timeout
    rec.plan = lambda n, _doc: "slow" if n == 5 else (503 if n % 3 == 0 else 200)
    sink = Sink(transport, WebhookTarget(url, KEYS, timeout_s=0.3),
                SinkOptions(name="hook", backoff_s=0.01, max_attempts=5))
    th = run_in_thread(sink)
    results = [make_result(i) for i in range(24)]
    publish_results(transport, results)
    wait_for(lambda: rec.frames() == {r.frame_id for r in results}, 30, "every result")
    sink.stop()
    th.join(10)
    assert not th.is_alive()
    assert rec.bad_signatures == 0
    assert sink.counts.delivered == 24 and sink.counts.failed == 0
    assert sink.counts.retried >= 8  # 503s and the timeout, each retried
    first = rec.accepted["frame0003"][0]
    assert first["source_id"] == "cam-a"
    assert first["results"][0] == {"caption": "grey aircraft", "bbox": [4.0, 2.0, 30.0, 40.0],
                                   "score": 0.9}
    assert first["results"][1]["score"] is None  # NaN travels as null: valid JSON
    assert pending(transport, "sink-hook") == 0 and sink.lag() == 0
    scrape = generate_latest(sink.metrics.registry).decode()
    assert 'spotline_sink_delivered_total{sink="hook"} 24.0' in scrape
    assert f'spotline_sink_retried_total{{sink="hook"}} {float(sink.counts.retried)}' in scrape
    assert 'spotline_sink_lag{sink="hook"} 0.0' in scrape


def test_webhook_dead_letters_after_n_failures_at_once_on_400_and_on_bad_json(
        transport: Transport, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.plan = lambda _n, doc: {"broken": 500, "bad": 400}.get(doc["source_id"], 200)
    sink = Sink(transport, WebhookTarget(url, KEYS, timeout_s=2),
                SinkOptions(name="dl", backoff_s=0.01, max_attempts=3))
    th = run_in_thread(sink)
    good = [make_result(i) for i in range(5)]
    nan_box = make_result(92).replace(boxes=((float("nan"), 0.0, 1.0, 1.0), (0.0,) * 4))
    publish_results(transport, [*good[:2], make_result(90, "broken"), make_result(91, "bad"),
                                nan_box, *good[2:]])
    wait_for(lambda: sink.counts.delivered + sink.counts.failed == 8, 30, "every result handled")
    sink.stop()
    th.join(10)
    assert rec.frames() == {r.frame_id for r in good}
    assert sink.counts.failed == 3
    dead = {f[b"frame"].decode(): f for _i, f in transport.r.xrange(transport.keys.dead)}
    assert set(dead) == {"frame0090", "frame0091", "frame0092"}
    assert b"not representable as JSON" in dead["frame0092"][b"reason"]
    assert b"after 3 attempt(s): HTTP 500" in dead["frame0090"][b"reason"]
    assert b"after 1 attempt(s): HTTP 400" in dead["frame0091"][b"reason"]
    assert dead["frame0090"][b"stream"] == transport.keys.results.encode()
    assert pending(transport, "sink-dl") == 0


def test_webhook_is_signed_the_standard_webhooks_way_and_an_old_timestamp_is_refused(
        transport: Transport, receiver: tuple[Receiver, str]) -> None:
    """The receiver verifies with docs/results.md's own function: real deliveries pass; the same
    request 5 minutes later, a changed body or another secret fail; a delivery whose timestamp
    is 400 s old (a replayed request) gets a 401 and is dead-lettered, never accepted."""
    rec, url = receiver
    sink = Sink(transport, WebhookTarget(url, KEYS, timeout_s=2),
                SinkOptions(name="std", backoff_s=0.01, max_attempts=3))
    th = run_in_thread(sink)
    publish_results(transport, [make_result(i) for i in range(2)])
    wait_for(lambda: len(rec.frames()) == 2, 20, "both results")
    sink.stop()
    th.join(10)
    headers, body = rec.raw[0]
    sig = headers[SIGNATURE_HEADER]
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", sig), sig
    ts = int(headers[TIMESTAMP_HEADER])
    assert abs(time.time() - ts) < 60
    assert headers[ID_HEADER] == json.loads(body)["frame_id"]
    assert verify_webhook(SECRET, headers, body)
    assert verify_webhook(SECRET, headers, body, now=ts + 299)
    assert not verify_webhook(SECRET, headers, body, now=ts + 301)  # replayed 5 min later
    assert not verify_webhook(SECRET, headers, body.replace(b"cam-a", b"cam-b"))
    assert not verify_webhook(NEW_SECRET, headers, body)
    assert not verify_webhook(SECRET, {**headers, TIMESTAMP_HEADER: str(ts + 1)}, body)

    old = Sink(transport, WebhookTarget(url, KEYS, timeout_s=2, clock=lambda: time.time() - 400),
               SinkOptions(name="old", start="all", backoff_s=0.01, max_attempts=3))
    th = run_in_thread(old)
    wait_for(lambda: old.counts.failed == 2, 20, "both refused")
    old.stop()
    th.join(10)
    assert rec.bad_signatures == 2 and len(rec.raw) == 2  # nothing more was accepted
    reasons = [f[b"reason"] for _i, f in transport.r.xrange(transport.keys.dead)]
    assert len(reasons) == 2 and all(b"after 1 attempt(s): HTTP 401" in r for r in reasons)


def test_webhook_secret_rotates_without_a_restart(
        transport: Transport, receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    """The sink re-reads its secret file when it changes: old secret; old and new (two
    signatures, either verifies); new only; an invalid file keeps the last good secrets."""
    rec, url = receiver
    path = tmp_path / "hook.secrets"
    stamp = [1_700_000_000_000_000_000]

    def write(text: str) -> None:
        path.write_text(text)
        stamp[0] += 1_000_000_000  # a distinct modification time per version, whatever the fs
        os.utime(path, ns=(stamp[0], stamp[0]))

    write(SECRET + "\n")
    sink = Sink(transport, WebhookTarget(url, SecretFile(path), timeout_s=2),
                SinkOptions(name="rot", backoff_s=0.01, max_attempts=2))
    th = run_in_thread(sink)

    def deliver(i: int) -> tuple[dict[str, str], bytes]:
        publish_results(transport, [make_result(i)])
        wait_for(lambda: f"frame{i:04d}" in rec.frames(), 20, f"result {i}")
        return rec.raw[-1]

    try:
        headers, body = deliver(0)
        assert len(headers[SIGNATURE_HEADER].split()) == 1
        write(f"# rotating\n{SECRET}\n{NEW_SECRET}\n")
        headers, body = deliver(1)
        assert len(headers[SIGNATURE_HEADER].split()) == 2
        assert verify_webhook(SECRET, headers, body) and verify_webhook(NEW_SECRET, headers, body)
        rec.secret = NEW_SECRET  # the receiver moves to the new secret
        write(NEW_SECRET + "\n")
        headers, body = deliver(2)
        assert verify_webhook(NEW_SECRET, headers, body)
        assert not verify_webhook(SECRET, headers, body)
        write("not-a-whsec-secret\n")  # a mistake: the sink keeps signing with the last good
        headers, body = deliver(3)
        assert verify_webhook(NEW_SECRET, headers, body)
    finally:
        sink.stop()
        th.join(10)
    assert rec.bad_signatures == 0 and sink.counts.failed == 0


def test_webhook_secret_file_must_hold_whsec_secrets(tmp_path: Path) -> None:
    from spotline.common.errors import SpotlineError

    bad = tmp_path / "bad"
    for text, problem in (("", "holds no secret"), ("s3cret", "whsec_<base64>"),
                          ("whsec_%%%", "not base64"), ("whsec_c2hvcnQ=", "at least 16")):
        bad.write_text(text)
        with pytest.raises(SpotlineError, match=re.escape(problem)):
            SecretFile(bad)


def spawn_sink(settings: Settings, url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "spotline", "sink", *args],
                            env=child_env(settings, url), cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


def test_webhook_sink_killed_mid_stream_loses_nothing(
        redis_server: EmbeddedRedis, settings: Settings, transport: Transport,
        receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    rec, url = receiver
    rec.delay_s = 0.02  # ~50 results/s, so the kill lands mid-stream
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    args = ["webhook", url, "--secret-file", str(secret), "--start", "all", "--backoff", "0.01"]
    results = [make_result(i, source=f"cam-{i % 3}") for i in range(80)]
    publish_results(transport, results)
    proc = spawn_sink(settings, redis_server.url, *args)
    try:
        wait_for(lambda: len(rec.frames()) >= 15, 30, "the first deliveries")
        proc.kill()  # SIGKILL: no chance to finish anything
        proc.wait(10)
        got = len(rec.frames())
        assert got < len(results), "the sink finished before the kill; nothing was tested"
        assert pending(transport, "sink-webhook") > 0  # read, not acknowledged: kept
        proc = spawn_sink(settings, redis_server.url, *args)
        wait_for(lambda: rec.frames() == {r.frame_id for r in results}, 40, "every result")
        wait_for(lambda: pending(transport, "sink-webhook") == 0, 10, "the last ack")
    finally:
        rc = stop(proc)
    assert rc == 0
    dupes = sum(len(v) - 1 for v in rec.accepted.values())
    assert dupes <= 1  # at least once: only the request in flight at the kill may repeat
    assert rec.bad_signatures == 0


# --- MQTT -------------------------------------------------------------------------------------
@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make tools, or apt-get install -y mosquitto)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    try:
        wait_for(up, 10, "mosquitto")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Subscriber:
    """A real MQTT client subscribed to every source's results topic."""

    def __init__(self, port: int, topic: str = "spotline/+/results") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
        c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_a: self.ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert self.ready.wait(10), "subscription not confirmed"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def frames(self) -> set[str]:
        with self.lock:
            return {doc["frame_id"] for _t, doc in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_sink_publishes_per_source_topics_at_qos1(transport: Transport,
                                                       mosquitto: int) -> None:
    sub = Subscriber(mosquitto)
    sink = Sink(transport, MqttTarget(f"mqtt://127.0.0.1:{mosquitto}", client_id="sink-t1"),
                SinkOptions(name="mq", backoff_s=0.01))
    th = run_in_thread(sink)
    results = [make_result(i, source=f"drone-{i % 2}") for i in range(10)]
    try:
        publish_results(transport, results)
        wait_for(lambda: sub.frames() == {r.frame_id for r in results}, 20, "every result")
    finally:
        sink.stop()
        th.join(10)
        sub.close()
    for topic, doc in sub.messages:
        assert topic == f"spotline/{doc['source_id']}/results"
    assert sink.counts.delivered == 10 and pending(transport, "sink-mq") == 0


def test_mqtt_sink_killed_and_restarted_loses_nothing(
        redis_server: EmbeddedRedis, settings: Settings, transport: Transport,
        mosquitto: int) -> None:
    sub = Subscriber(mosquitto, "fleet/+/boxes")
    args = ["mqtt", f"mqtt://127.0.0.1:{mosquitto}", "--topic", "fleet/{source_id}/boxes",
            "--backoff", "0.01"]
    first = [make_result(i, source=f"cam-{i % 3}") for i in range(30)]
    second = [make_result(i, source=f"cam-{i % 3}") for i in range(30, 70)]
    proc = spawn_sink(settings, redis_server.url, *args)
    try:
        wait_for(lambda: group_exists(transport, "sink-mqtt"), 20, "the sink's group")
        publish_results(transport, first)
        wait_for(lambda: len(sub.frames()) >= 5, 20, "the first deliveries")
        proc.kill()
        proc.wait(10)
        publish_results(transport, second)  # published while the sink is down
        proc = spawn_sink(settings, redis_server.url, *args)
        wanted = {r.frame_id for r in first + second}
        wait_for(lambda: sub.frames() == wanted, 30, "every result")
        wait_for(lambda: pending(transport, "sink-mqtt") == 0, 10, "the last ack")
    finally:
        rc = stop(proc)
        sub.close()
    assert rc == 0
    for topic, doc in sub.messages:
        assert topic == f"fleet/{doc['source_id']}/boxes"


def test_mqtt_sink_dead_letters_a_source_id_that_cannot_be_a_topic(transport: Transport,
                                                                   mosquitto: int) -> None:
    """A source id with a wildcard (+ #), NUL or another control character makes no valid
    topic: that result is dead-lettered with the reason, at once; the sink goes on and
    delivers the others."""
    sub = Subscriber(mosquitto, "#")
    sink = Sink(transport, MqttTarget(f"mqtt://127.0.0.1:{mosquitto}", client_id="sink-bad"),
                SinkOptions(name="mqbad", backoff_s=0.01, max_attempts=3))
    th = run_in_thread(sink)
    bad = {"frame0100": "cam+1", "frame0101": "cam/#", "frame0102": "a\x00b",
           "frame0103": "line\nbreak", "frame0104": ""}
    good = [make_result(i, source="cam-ok") for i in range(3)]
    try:
        publish_results(transport, [good[0], *(make_result(int(f[5:]), source=sid)
                                               for f, sid in bad.items()), *good[1:]])
        wait_for(lambda: sink.counts.delivered + sink.counts.failed == 8, 30, "every result")
        wait_for(lambda: sub.frames() == {r.frame_id for r in good}, 20, "the good ones")
    finally:
        sink.stop()
        th.join(10)
        sub.close()
    assert not th.is_alive() and sink.counts.failed == 5 and sink.counts.delivered == 3
    assert {t for t, _doc in sub.messages} == {"spotline/cam-ok/results"}
    dead = {f[b"frame"].decode(): f[b"reason"].decode()
            for _i, f in transport.r.xrange(transport.keys.dead)}
    assert set(dead) == set(bad)
    assert all("after 1 attempt(s)" in r and "MQTT topic" in r for r in dead.values()), dead
    assert pending(transport, "sink-mqbad") == 0


def test_mqtt_topic_template_with_a_wildcard_is_refused_at_start() -> None:
    from spotline.common.errors import SpotlineError

    for template in ("fleet/+/{source_id}", "fleet/{source_id}/#"):
        with pytest.raises(SpotlineError, match="wildcards"):
            MqttTarget("mqtt://127.0.0.1:1", topic=template)
