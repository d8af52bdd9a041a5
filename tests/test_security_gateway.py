"""The gateway secure by default, against the real app (in-process and as `spotline serve`) and
a real Redis: one test per reproduction of the gateway's findings in the security review.

An open gateway on every interface refuses to start; /sources needs the admin scope; a large
body without a key is refused before it is read; cross-site requests (text/plain, a foreign
Host) are refused; the live page carries a strict CSP; one key cannot see another's /identify
frames; an emptied key file closes the gateway; failed authentications are limited per address;
/identify is capped per request and its rate limit is charged per frame; and parsing a large
/identify leaves the event loop free for /health.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from spotline.common.codec import decode, encode
from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.envelope import Result
from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, load_settings
from spotline.common.transport import DATA_FIELD, FRAME_FIELD
from spotline.producer.access import tenant_source
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from spotline.producer.guard import allowed_hosts
from tests.conftest import ROOT, child_env, spotline_serve, uvicorn_gateway
from tests.faultlib import small_frame, wait_for

LOCAL = "http://127.0.0.1"
JSON = {"content-type": "application/json"}
SECRET_CAPTION = "confidential caption of tenant A"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def settings_for(**overrides: Any) -> Settings:
    return load_settings(env={}, **{"namespace": f"gsec{uuid.uuid4().hex[:8]}", **overrides})


@contextmanager
def gateway(redis_server: EmbeddedRedis, **overrides: Any) -> Iterator[TestClient]:
    """The real app in-process (Host 127.0.0.1) over a fresh namespace."""
    s = settings_for(**overrides)
    client = Client.connect(redis_server.url, s)
    try:
        with TestClient(create_app(s, client, timeout_s=1), base_url=LOCAL) as http:
            yield http
    finally:
        client.close()


# --- safe defaults ------------------------------------------------------------------------------
def test_an_open_gateway_on_every_interface_refuses_to_start(redis_server: EmbeddedRedis,
                                                            tmp_path: Path) -> None:
    s = settings_for()
    assert s.http_host == "127.0.0.1"  # the default bind address
    out = subprocess.run([sys.executable, "-m", "spotline", "serve", "--host", "0.0.0.0",
                          "--port", str(free_port())], env=child_env(s, redis_server.url),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "refusing to serve an open gateway on 0.0.0.0" in out.stderr
    assert "insecure_open_gateway" in out.stderr and "api_keys" in out.stderr


def test_the_insecure_switch_opens_it_and_says_so(redis_server: EmbeddedRedis,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    s = settings_for(insecure_open_gateway=True)
    client = Client.connect(redis_server.url, s)
    with caplog.at_level(logging.WARNING):
        app = create_app(s, client, host="0.0.0.0")
    assert any("INSECURE" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    with TestClient(app, base_url=LOCAL) as http:
        assert http.get("/health").json() == {"message": "health ok",
                                              "auth": "open (insecure)"}
    with pytest.raises(ConfigError, match="refusing to serve an open gateway"):
        create_app(settings_for(), client, host="10.1.2.3")
    keyed = create_app(settings_for(api_keys="k"), client, host="0.0.0.0")  # keys: fine
    with TestClient(keyed, base_url=LOCAL) as http:
        assert http.get("/health").json() == {"message": "health ok"}
    client.close()


# --- scopes ------------------------------------------------------------------------------------
def test_sources_need_the_admin_scope(redis_server: EmbeddedRedis) -> None:
    feed = {"source_id": "x", "spec": "rtsp://camera.example/stream", "captions": ["a"]}
    keys = "caller, reader:read, boss:admin"
    with gateway(redis_server, api_keys=keys, auth_fail_per_minute=0) as http:
        for key in (None, "caller", "reader"):
            headers = {"X-API-Key": key} if key else {}
            want = 401 if key is None else 403
            assert http.get("/sources", headers=headers).status_code == want
            assert http.post("/sources", json=feed, headers=headers).status_code == want
            assert http.delete("/sources/x", headers=headers).status_code == want
        boss = {"X-API-Key": "boss"}
        assert http.get("/sources", headers=boss).status_code == 200
        assert http.post("/sources", json=feed, headers=boss).status_code not in (401, 403)
        # a bare key gets identify and read, never admin; admin alone neither reads nor asks
        assert http.post("/identify", content=b"{}", headers={**JSON, "X-API-Key": "caller"}
                         ).status_code == 400  # let in: the body is what is wrong
        assert http.get("/live/sources", headers={"X-API-Key": "caller"}).status_code == 200
        assert http.post("/identify", content=b"{}", headers={**JSON, "X-API-Key": "reader"}
                         ).status_code == 403
        assert http.get("/live/sources", headers=boss).status_code == 403
        assert "lacks the 'read' scope" in http.get("/live/sources", headers=boss).text
        assert http.get("/an/unknown/route", headers={"X-API-Key": "caller"}).status_code == 403
        spec = http.get("/openapi.json").json()  # open, and says how to send a key
        assert set(spec["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    settings = settings_for(api_keys="k:root")
    client = Client.connect(redis_server.url, settings)
    with pytest.raises(ConfigError, match="scopes are identify\\+read\\+admin"):
        create_app(settings, client)
    client.close()


# --- bounded before authenticated --------------------------------------------------------------
def _server_unread(server_port: int, client_port: int) -> int:
    """Bytes the server has not read yet on one loopback connection (/proc/net/tcp rx_queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            return int(fields[4].split(":")[1], 16)
    return 0


def _answer(sock: socket.socket) -> str:
    """One whole HTTP answer read from a raw socket: its head, then Content-Length bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-answer: {data!r}"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_large_body_without_a_key_is_refused_before_it_is_read(
        redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    s = settings_for(api_keys="ops-key:admin")
    total = 400 * 2**20  # what the request says it sends: 400 MiB
    with spotline_serve(s, redis_server.url, tmp_path / "serve.log", "--timeout", "30"
                        ) as (base, served):
        proc = psutil.Process(served.pid)
        before = proc.memory_info().rss
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /sources HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
            sock.sendall(b"{" + b" " * 65535)  # the first 64 KiB of it
            answer = _answer(sock)
            assert answer.startswith("HTTP/1.1 401"), answer  # not 422: no body was parsed
            assert "connection: close" in answer.lower()
            sent, chunk = 65536, b" " * 2**20
            try:  # the rest: the gateway has closed the connection, so this stops early
                while sent < total:
                    sent += sock.send(chunk)
            except OSError:
                pass
        assert sent < total / 4, f"the gateway took {sent / 2**20:.0f} MiB of the body"
        # with a key, a body over the limit is refused from its Content-Length alone
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /sources HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: ops-key\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
            answer = _answer(sock)
        assert answer.startswith("HTTP/1.1 413") and "over the 65536-byte limit" in answer

        def chunks() -> Iterator[bytes]:  # chunked, no Content-Length: 64 MiB without a key
            for _ in range(64):
                yield chunk
        try:
            r = httpx.post(f"{base}/sources", content=chunks(), headers=JSON, timeout=30)
            assert r.status_code == 401, r.text
        except httpx.TransportError:  # closed mid-upload: refused all the same
            pass
        grew = (proc.memory_info().rss - before) / 2**20
        assert grew < 40, f"gateway RSS grew {grew:.0f} MiB"
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200


# --- cross-site requests -----------------------------------------------------------------------
def test_only_json_posts_are_accepted(redis_server: EmbeddedRedis) -> None:
    body = json.dumps({"instances": [{"key": 0, "caption": "x", "b64": b64(small_frame(1))}]})
    with gateway(redis_server) as http:  # open (loopback): CSRF is what is left to fear
        for media in ("text/plain", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = {"content-type": media} if media else {}
            r = http.post("/identify", content=body, headers=headers)
            assert r.status_code == 415, (media, r.text)
            assert "application/json" in r.json()["error"]
            assert http.post("/sources", content="{}", headers=headers).status_code == 415
        assert http.request("DELETE", "/sources/x", content="{}",
                            headers={"content-type": "text/plain"}).status_code == 415
        assert http.delete("/sources/x").status_code == 404  # no body: nothing to check
        ok = http.post("/identify", content=b"{}",
                       headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 400  # past the guard


def test_a_foreign_host_is_refused(redis_server: EmbeddedRedis) -> None:
    with gateway(redis_server) as http:  # DNS rebinding: evil.example resolving to 127.0.0.1
        for method, path in (("POST", "/identify"), ("GET", "/live/sources"),
                             ("GET", "/sources"), ("GET", "/live")):
            r = http.request(method, path, headers={**JSON, "host": "evil.example:5004"},
                             content=b"{}" if method == "POST" else None)
            assert r.status_code == 421, (path, r.text)
            assert "allowed_hosts" in r.json()["error"]
        for host in ("localhost:5004", "127.0.0.1", "[::1]:5004"):
            assert http.get("/live/sources", headers={"host": host}).status_code == 200
        assert http.get("/health", headers={"host": "10.0.0.7:5004"}).status_code == 200
    with gateway(redis_server, allowed_hosts="gw.example") as http:
        assert http.get("/live/sources", headers={"host": "gw.example:443"}).status_code == 200
        assert http.get("/live/sources", headers={"host": "localhost"}).status_code == 421
    with gateway(redis_server, allowed_hosts="*") as http:
        assert http.get("/live/sources", headers={"host": "any.example"}).status_code == 200
    assert "10.1.2.3" in allowed_hosts(settings_for(), "10.1.2.3")  # the bind address too


def test_the_live_page_sends_security_headers(redis_server: EmbeddedRedis) -> None:
    with gateway(redis_server) as http:
        page = http.get("/live")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        for r in (page, http.get("/health"), http.get("/live/sources")):
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
        # the CSP allows no inline code: the page's script and style are files it serves
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text)
        assert "<style" not in page.text and " style=" not in page.text
        js = http.get("/live/static/live.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert http.get("/live/static/live.css").status_code == 200
        assert http.get("/live/static/..%2Fgateway.py").status_code == 404


# --- tenants -----------------------------------------------------------------------------------
def _collect(client: Client, env: Any, boxes: tuple[tuple[float, ...], ...]) -> None:
    """Write a frame's result as the collector does (this test plays the pipeline)."""
    result = Result(frame_id=env.frame_id, source_id=env.source_id,
                    capture_time=env.capture_time, captions=tuple(env.captions),
                    boxes=boxes, scores=(0.9,) * len(boxes), image_size=(320, 240))
    client.t.r.xadd(client.keys.results, {FRAME_FIELD: env.frame_id.encode(),
                                          DATA_FIELD: encode(result)})


def _published(client: Client, n: int) -> list[Any]:
    inbox = client.keys.inbox("detect")
    wait_for(lambda: client.t.r.xlen(inbox) >= n, 20, f"{n} frames on the inbox")
    return [decode(fields[DATA_FIELD]) for _, fields in client.t.r.xrange(inbox)]


def _first_events(base: str, key: str, until_source: str) -> str:
    """The live event stream of a key up to the event of ``until_source`` (sources come in id
    order, so every source before it has been sent)."""
    text = ""
    with httpx.stream("GET", f"{base}/live/events", headers={"X-API-Key": key},
                      timeout=20) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            text += line + "\n"
            if line.startswith("data:") and json.loads(line[5:])["source_id"] == until_source:
                return text
    raise AssertionError(f"the stream ended before {until_source}: {text[:500]}")


def test_a_key_sees_only_its_own_identify_frames(redis_server: EmbeddedRedis) -> None:
    s = settings_for(api_keys="tenant-a-key, tenant-b-key, ops-key:read+admin")
    with uvicorn_gateway(s, redis_server.url, timeout_s=30) as (base, client):
        answer: list[httpx.Response] = []
        request = {"instances": [{"key": 0, "caption": SECRET_CAPTION,
                                  "b64": b64(small_frame(1))}]}
        ask = threading.Thread(target=lambda: answer.append(httpx.post(
            f"{base}/identify", json=request, headers={"X-API-Key": "tenant-a-key"},
            timeout=30)))
        ask.start()
        (frame_a,) = _published(client, 1)
        assert frame_a.source_id == tenant_source("tenant-a-key")
        assert "tenant-a-key" not in frame_a.source_id  # a digest, never the key
        _collect(client, frame_a, ((1.0, 2.0, 3.0, 4.0),))
        ask.join(30)
        assert answer[0].status_code == 200 and answer[0].json() == {
            "predictions": [[1.0, 2.0, 3.0, 4.0]]}
        # an operator's feed, which every read key may see
        client.publish(small_frame(2), ["runway"], source_id="zz-operator")
        _collect(client, _published(client, 2)[1], ((5.0, 6.0, 7.0, 8.0),))

        def sources(key: str) -> dict[str, Any]:
            r = httpx.get(f"{base}/live/sources", headers={"X-API-Key": key}, timeout=10)
            assert r.status_code == 200
            return {st["source_id"]: st for st in r.json()}

        wait_for(lambda: {"zz-operator", frame_a.source_id} <= set(sources("ops-key")), 20,
                 "both sources in the live view")
        mine = sources("tenant-a-key")
        assert set(mine) == {frame_a.source_id, "zz-operator"}
        assert mine[frame_a.source_id]["result"]["results"][0]["caption"] == SECRET_CAPTION
        image = f"{base}{mine[frame_a.source_id]['image']}"
        assert httpx.get(image, headers={"X-API-Key": "tenant-a-key"}).status_code == 200

        b = {"X-API-Key": "tenant-b-key"}
        theirs = httpx.get(f"{base}/live/sources", headers=b).text
        assert SECRET_CAPTION not in theirs and frame_a.source_id not in theirs
        assert "zz-operator" in theirs
        fid = frame_a.frame_id
        for source in (frame_a.source_id, "zz-operator", tenant_source("tenant-b-key")):
            # not B's source to read, or not the source the frame belongs to
            assert httpx.get(f"{base}/live/frames/{source}/{fid}.jpg", headers=b
                             ).status_code == 404, source
        events = _first_events(base, "tenant-b-key", "zz-operator")
        assert SECRET_CAPTION not in events and frame_a.source_id not in events
        assert SECRET_CAPTION in _first_events(base, "ops-key", "zz-operator")


# --- fail closed, and guessing -----------------------------------------------------------------
def test_an_emptied_key_file_closes_the_gateway(redis_server: EmbeddedRedis,
                                                tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# keys to come\n\n")
    routes = (("GET", "/sources"), ("POST", "/sources"), ("DELETE", "/sources/x"),
              ("GET", "/live/sources"), ("POST", "/identify"))

    def codes(**headers: str) -> set[int]:
        return {http.request(m, p, headers={**JSON, **headers},
                             content=b"{}" if m == "POST" else None).status_code
                for m, p in routes}

    with gateway(redis_server, api_keys_file=str(keys), auth_fail_per_minute=0) as http:
        assert http.get("/health").json() == {"message": "health ok"}  # not "open"
        assert codes() == {401}  # configured but empty: closed
        keys.write_text("ops-key:admin+read+identify\n")
        assert http.get("/sources", headers={"X-API-Key": "ops-key"}).status_code == 200
        keys.write_text("# every key revoked\n")
        assert codes() == {401} and codes(**{"X-API-Key": "ops-key"}) == {401}
        keys.write_text("ops-key:admin\n")
        assert http.get("/sources", headers={"X-API-Key": "ops-key"}).status_code == 200
        keys.unlink()  # a key file that is gone lets nobody in either
        assert codes() == {401} and codes(**{"X-API-Key": "ops-key"}) == {401}


def test_failed_authentications_are_limited_per_address(redis_server: EmbeddedRedis) -> None:
    with gateway(redis_server, api_keys="right-key") as http:  # rate_limit 0: off
        assert http.app.state.access.limiter is None
        answers = [http.get("/live/sources", headers={"X-API-Key": f"guess-{i}"})
                   for i in range(40)]
        codes = [r.status_code for r in answers]
        assert codes[:10] == [401] * 10, codes  # auth_fail_per_minute 10: a burst of 10
        assert codes[10:] == [429] * 30, codes
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 7
        assert "too many failed authentications" in answers[-1].json()["error"]
        # while the address is held back, a right guess cannot be told from a wrong one
        assert http.get("/live/sources", headers={"X-API-Key": "right-key"}).status_code == 429


# --- /identify floods --------------------------------------------------------------------------
def test_identify_caps_instances_and_distinct_images(redis_server: EmbeddedRedis) -> None:
    same = b64(small_frame(1))
    with gateway(redis_server, identify_max_instances=4, identify_max_images=2) as http:
        r = http.post("/identify", json={"instances": [
            {"key": i, "caption": f"c{i}", "b64": same} for i in range(5)]})
        assert r.status_code == 413 and "identify_max_instances" in r.json()["error"]
        r = http.post("/identify", json={"instances": [
            {"key": i, "caption": "c", "b64": b64(small_frame(i))} for i in range(3)]})
        assert r.status_code == 413 and "3 distinct images" in r.json()["error"]
        r = http.post("/identify", json={"instances": [
            {"key": i, "caption": f"c{i}", "b64": same} for i in range(4)]})
        assert r.status_code == 504  # within the caps: published (no pipeline here)


def test_the_rate_limit_is_charged_per_frame(redis_server: EmbeddedRedis) -> None:
    def request(n: int) -> dict[str, Any]:
        return {"instances": [{"key": i, "caption": "c", "b64": b64(small_frame(10 + i))}
                              for i in range(n)]}

    key = {"X-API-Key": "k"}
    # one token per 100 s: nothing refills while the test runs
    with gateway(redis_server, api_keys="k", rate_limit=0.01, rate_burst=3) as http:
        # more distinct images than the burst could ever pay for (a token for the request)
        r = http.post("/identify", json=request(4), headers=key)
        assert r.status_code == 413 and "rate_burst" in r.json()["error"]
        r = http.post("/identify", json=request(2), headers=key)  # two frames: two tokens
        assert r.status_code == 504  # let through (no pipeline here): the bucket is empty
        r = http.post("/identify", json=request(1), headers=key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 60
        assert "rate limit" in r.json()["error"]


def test_health_answers_while_a_large_identify_is_parsed(redis_server: EmbeddedRedis,
                                                         tmp_path: Path) -> None:
    """15 images of 2.8 MB and a last instance that is not base64: the gateway parses and
    decodes ~57 MB before it answers 400. A /health sent the moment that work starts must be
    answered before the /identify is: the work runs off the event loop."""
    s = settings_for(max_frame_bytes=30_000_000)
    instances = [{"key": i, "caption": "c", "b64": b64(small_frame(i) + bytes(2_800_000))}
                 for i in range(15)] + [{"key": 15, "caption": "c", "b64": "%%%"}]
    body = json.dumps({"instances": instances}).encode()
    with spotline_serve(s, redis_server.url, tmp_path / "serve.log", "--timeout", "30"
                        ) as (base, _proc):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as big, \
                socket.create_connection(("127.0.0.1", port), timeout=30) as probe:
            big.sendall(b"POST /identify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            big.sendall(body[:-1])
            client_port = big.getsockname()[1]
            wait_for(lambda: _server_unread(port, client_port) == 0, 30,
                     "the gateway has read all but the last byte")
            big.sendall(body[-1:])  # the body is complete: the parsing starts now
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            health = _answer(probe)
            identify_done_first = bool(select.select([big], [], [], 0)[0])
            t0 = time.monotonic()
            answer = b""
            while b"base64" not in answer and time.monotonic() - t0 < 60:
                answer += big.recv(65536)
        assert health.startswith("HTTP/1.1 200") and "health ok" in health
        assert answer.startswith(b"HTTP/1.1 400") and b"instances.15.b64" in answer, answer
        assert not identify_done_first, "/health waited for the /identify parsing"
