"""The gateway's guards against a real Redis and a real `spotline serve`: API keys (header or
bearer, rotated through a file without a restart), a per-key token bucket shared by replicas,
readiness, and bodies refused before they are held in memory."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings, load_settings
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from tests.conftest import spotline_serve
from tests.faultlib import wait_for

LOCAL = "http://127.0.0.1"  # a Host the gateway answers to (allowed_hosts)

BAD_BODY = b"{}"  # past the guards, the gateway answers it 400: enough to tell them apart


def gateway(redis_server: EmbeddedRedis, **overrides: object) -> tuple[TestClient, Client]:
    s = load_settings(env={}, **{"namespace": f"sec{uuid.uuid4().hex[:8]}", **overrides})
    client = Client.connect(redis_server.url, s)
    return TestClient(create_app(s, client, timeout_s=1), base_url=LOCAL), client


@pytest.fixture
def keyed(redis_server: EmbeddedRedis) -> Iterator[TestClient]:
    http, client = gateway(redis_server, api_keys="alpha-key, beta-key")
    with http:
        yield http
    client.close()


def post(http: TestClient, **headers: str) -> httpx.Response:
    return http.post("/identify", content=BAD_BODY,
                     headers={"content-type": "application/json", **headers})


def test_identify_needs_a_valid_key(keyed: TestClient) -> None:
    r = post(keyed)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in r.json()["error"]
    assert post(keyed, **{"X-API-Key": "wrong"}).status_code == 401
    assert post(keyed, authorization="Bearer wrong").status_code == 401
    assert post(keyed, **{"X-API-Key": "alpha-key"}).status_code == 400  # let in
    assert post(keyed, authorization="Bearer beta-key").status_code == 400


def test_health_ready_and_metrics_stay_open(keyed: TestClient) -> None:
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/metrics").status_code == 200
    assert keyed.get("/ready").status_code == 503  # open, and no workers in this namespace


def test_keys_rotate_through_the_file_without_a_restart(redis_server: EmbeddedRedis,
                                                        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nold-key\n")
    http, client = gateway(redis_server, api_keys_file=str(keys))
    with http:
        assert post(http, **{"X-API-Key": "old-key"}).status_code == 400
        keys.write_text("new-key-1  # rotated\nnew-key-2\n")
        assert post(http, **{"X-API-Key": "old-key"}).status_code == 401
        assert post(http, **{"X-API-Key": "new-key-2"}).status_code == 400
    client.close()


def test_an_open_gateway_says_so_at_start(redis_server: EmbeddedRedis,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spotline.producer.access"):
        http, client = gateway(redis_server)
    client.close()
    assert any("OPEN" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with http:
        assert post(http).status_code == 400  # no key needed


def test_rate_limit_is_per_key_and_shared_by_replicas(redis_server: EmbeddedRedis) -> None:
    ns = f"sec{uuid.uuid4().hex[:8]}"
    # one token per 100 s: nothing refills while the test runs
    one, c1 = gateway(redis_server, namespace=ns, api_keys="k1,k2", rate_limit=0.01,
                      rate_burst=3)
    two, c2 = gateway(redis_server, namespace=ns, api_keys="k1,k2", rate_limit=0.01,
                      rate_burst=3)
    with one, two:
        codes = [post(http, **{"X-API-Key": "k1"}).status_code for http in (one, two, one)]
        assert codes == [400, 400, 400]  # the bucket's 3 tokens, spent across both replicas
        r = post(two, **{"X-API-Key": "k1"})
        assert r.status_code == 429, r.text
        assert 90 <= int(r.headers["retry-after"]) <= 101 and "rate limit" in r.json()["error"]
        assert post(one, **{"X-API-Key": "k2"}).status_code == 400  # k2 has its own bucket
    c1.close()
    c2.close()


def test_a_refilled_bucket_lets_the_key_in_again(redis_server: EmbeddedRedis) -> None:
    http, client = gateway(redis_server, api_keys="k", rate_limit=20, rate_burst=1)
    with http:
        assert post(http, **{"X-API-Key": "k"}).status_code == 400
        r = post(http, **{"X-API-Key": "k"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        wait_for(lambda: post(http, **{"X-API-Key": "k"}).status_code == 400, 5,
                 "a token after 1/20 s")
    client.close()


def test_ready_lists_what_is_missing(redis_server: EmbeddedRedis) -> None:
    http, client = gateway(redis_server, upscale=False)
    with http:
        r = http.get("/ready")
    client.close()
    assert r.status_code == 503
    missing = r.json()["missing"]
    assert [m.split(":")[0] for m in missing] == ["detect", "score", "collect"], missing
    assert all("no live worker with its model loaded" in m for m in missing)


def test_ready_is_503_when_redis_is_down() -> None:
    server = EmbeddedRedis().start()
    http, client = gateway(server)
    server.close()
    with http:
        r = http.get("/ready")
    assert r.status_code == 503 and r.json()["missing"][0].startswith("redis:"), r.text


# --- bodies over the limit, against a real `spotline serve` -----------------------------------
@pytest.fixture(scope="module")
def serve(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, psutil.Process]]:
    s: Settings = load_settings(env={}, namespace=f"sec{uuid.uuid4().hex[:8]}",
                                max_frame_bytes=1_000_000)  # body limit 2 x 1 MB + 1 MiB
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with spotline_serve(s, redis_server.url, log) as (base, proc):
        yield base, psutil.Process(proc.pid)


def test_content_length_over_the_limit_is_refused_before_the_body(
        serve: tuple[str, psutil.Process]) -> None:
    base, _ = serve
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /identify HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # and never a byte
                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # the gateway closes the connection after answering
            answer += chunk
    text = answer.decode()
    assert text.startswith("HTTP/1.1 413"), text
    assert "1000000000 bytes is over the" in text


def test_a_huge_chunked_upload_leaves_memory_flat(serve: tuple[str, psutil.Process]) -> None:
    base, proc = serve
    before = proc.memory_info().rss
    peak = [before]
    sent = [0]
    chunk = b" " * (1024 * 1024)

    def body() -> Iterator[bytes]:  # 300 MiB, chunked (no Content-Length)
        for _ in range(300):
            peak[0] = max(peak[0], proc.memory_info().rss)
            sent[0] += len(chunk)
            yield chunk

    outcome: list[object] = []

    def upload() -> None:
        try:
            outcome.append(httpx.post(f"{base}/identify", content=body(), timeout=60,
                                      headers={"content-type": "application/json"}))
        except httpx.HTTPError as exc:  # the server closed the connection mid-upload
            outcome.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    thread.join(120)
    assert outcome, "the upload did not finish"
    after = proc.memory_info().rss
    grew = (max(peak[0], after) - before) / 2**20
    assert grew < 40, f"gateway RSS grew {grew:.0f} MiB over a {sent[0] / 2**20:.0f} MiB upload"
    if isinstance(outcome[0], httpx.Response):
        assert outcome[0].status_code == 413 and "over the" in outcome[0].json()["error"]
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200  # and it is still up
