"""The HTTP gateway over a real local pipeline (tiny models): the seed's contract, every bad
request, timeouts, metrics; and a seed-style client against a real `spotline serve` process."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.metrics import Metrics
from spotline.common.settings import Settings, load_settings
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from tests.conftest import ROOT, child_env

LOCAL = "http://127.0.0.1"  # a Host the gateway answers to (allowed_hosts)

# ultralytics' two bundled photos, read without importing ultralytics into this process
ASSETS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"  # type: ignore
BUS, ZIDANE = (ASSETS / "bus.jpg").read_bytes(), (ASSETS / "zidane.jpg").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def four_instances() -> list[dict[str, object]]:
    """The competition harness: 4 (image, caption) pairs per request, here over 2 images."""
    return [{"key": 0, "caption": "blue and white bus", "b64": b64(BUS)},
            {"key": 1, "caption": "man in a red tie", "b64": b64(ZIDANE)},
            {"key": 2, "caption": "man in a dark jacket", "b64": b64(BUS)},
            {"key": 3, "caption": "bald man in a suit", "b64": b64(ZIDANE)}]


@pytest.fixture(scope="module")
def pipeline(redis_server: EmbeddedRedis, data_dir: Path) -> Iterator[tuple[Settings, str]]:
    from spotline.pipeline.supervisor import LocalPipeline

    s = load_settings(env={}, namespace=f"gw{uuid.uuid4().hex[:8]}", data_dir=str(data_dir),
                      redis_url=redis_server.url).replace(imgsz=320, warmup=0, tta=False)
    with LocalPipeline(s, ready_timeout=300) as url:
        yield s, url


@pytest.fixture(scope="module")
def api(pipeline: tuple[Settings, str]) -> Iterator[tuple[TestClient, Client, Metrics]]:
    s, url = pipeline
    client = Client.connect(url, s)
    metrics = Metrics()
    with TestClient(create_app(s, client, metrics, timeout_s=120), base_url=LOCAL) as http:
        yield http, client, metrics
    client.close()


def test_health(api: tuple[TestClient, Client, Metrics]) -> None:
    http, _, _ = api
    r = http.get("/health")
    # the seed's answer; an open gateway (no keys, loopback) says so in one more field
    assert r.status_code == 200 and r.json() == {"message": "health ok",
                                                 "auth": "open (loopback)"}


def test_identify_four_instances_in_order(api: tuple[TestClient, Client, Metrics]) -> None:
    http, client, _ = api
    r = http.post("/identify", json={"instances": four_instances()})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 4
    assert all(len(p) == 4 and all(isinstance(v, float) for v in p) for p in predictions)
    # the same frames published directly give the same boxes, in instance order
    bus = client.publish(BUS, ["blue and white bus", "man in a dark jacket"])
    zid = client.publish(ZIDANE, ["man in a red tie", "bald man in a suit"])
    got = client.await_results([bus, zid], timeout=120)
    expected = [got[bus].boxes[0], got[zid].boxes[0], got[bus].boxes[1], got[zid].boxes[1]]
    assert predictions == [pytest.approx(list(b)) for b in expected]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"instances": [', 400, "Invalid JSON"),
    (json.dumps({"instances": [{"key": 0, "caption": "bus"}]}).encode(), 400,
     "instances.0.b64: Field required"),
    (json.dumps({"items": []}).encode(), 400, "instances: Field required"),
    (json.dumps({"instances": []}).encode(), 400, "instances: List should have at least 1"),
    (json.dumps({"instances": [{"key": 0, "caption": "bus", "b64": "%%%not base64"}]}).encode(),
     400, "instances.0.b64: not valid base64"),
    (json.dumps({"instances": [{"key": 0, "caption": "bus", "b64": b64(b"GIF89a junk")}]}
                ).encode(), 400, "instances.0: image could not be decoded"),
    (json.dumps({"instances": [{"key": 0, "caption": "  ", "b64": b64(BUS)}]}).encode(), 400,
     "instances.0: caption 0 is empty"),
])
def test_bad_requests(api: tuple[TestClient, Client, Metrics], body: bytes, status: int,
                      message: str) -> None:
    http, _, _ = api
    r = http.post("/identify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversized_body_is_413(pipeline: tuple[Settings, str]) -> None:
    s, url = pipeline
    small = s.replace(max_frame_bytes=1000)  # body limit: 2 x 1000 + 1 MiB
    client = Client.connect(url, small)
    with TestClient(create_app(small, client, timeout_s=5), base_url=LOCAL) as http:
        r = http.post("/identify", content=b"x" * (1024 * 1024 + 3000),
                      headers={"content-type": "application/json"})
    client.close()
    assert r.status_code == 413 and "over the" in r.json()["error"]


def test_an_image_the_pipeline_cannot_decode_is_a_422_naming_it(
        api: tuple[TestClient, Client, Metrics]) -> None:
    """A JPEG cut to 60% passes the gateway's header checks, fails to decode in detect: the
    HTTP client gets a 4xx naming the instance, subscribers still get the error result."""
    http, client, _ = api
    instances = four_instances()[:2]
    instances[1]["b64"] = b64(ZIDANE[: len(ZIDANE) * 6 // 10])
    r = http.post("/identify", json={"instances": instances})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "instances.1:" in error and "instances.0" not in error
    assert "decode" in error, error
    deadline = time.monotonic() + 30
    for _, res in client.subscribe(start="0", block_ms=200):  # replay: what subscribers saw
        if res.source_id == "http" and res.error and "decode" in res.error:
            break
        assert time.monotonic() < deadline, "no error result reached the results stream"


def test_ready_with_every_stage_live(api: tuple[TestClient, Client, Metrics]) -> None:
    http, _, _ = api
    r = http.get("/ready")
    assert r.status_code == 200 and r.json() == {"ready": True, "missing": []}, r.text


def test_pipeline_timeout_is_504(redis_server: EmbeddedRedis, settings: Settings) -> None:
    client = Client.connect(redis_server.url, settings)  # a namespace with no workers
    with TestClient(create_app(settings, client, timeout_s=1), base_url=LOCAL) as http:
        r = http.post("/identify", json={"instances": four_instances()[:1]})
    client.close()
    assert r.status_code == 504 and "did not answer in 1s" in r.json()["error"]


def test_metrics_and_openapi(api: tuple[TestClient, Client, Metrics]) -> None:
    http, _, _ = api
    http.get("/health")
    http.post("/identify", content=b"{", headers={"content-type": "application/json"})
    text = http.get("/metrics").text
    assert 'spotline_http_requests_total{route="/identify",status="400"}' in text
    spec = http.get("/openapi.json").json()
    assert {"/health", "/identify"} <= set(spec["paths"])


def test_seed_client_against_spotline_serve(pipeline: tuple[Settings, str],
                                            tmp_path: Path) -> None:
    """A client written to the seed's contract, against a real `spotline serve` process."""
    s, url = pipeline
    port = free_port()
    env = child_env(s, url)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "spotline", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--timeout", "120"], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers
            try:
                if httpx.get(f"{base}/health", timeout=1).json()["message"] == "health ok":
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "spotline serve did not start"
            time.sleep(0.05)
        # the seed's harness: base64 JPEGs, 4 instances a request, answers in instance order
        instances = [{"key": i, "caption": inst["caption"], "b64": inst["b64"]}
                     for i, inst in enumerate(four_instances())]
        r = httpx.post(f"{base}/identify", json={"instances": instances}, timeout=120)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 4 and all(len(p) == 4 for p in predictions)
        for (left, top, width, height), image in zip(predictions, [BUS, ZIDANE] * 2,
                                                     strict=True):
            w, h = (1280, 720) if image is ZIDANE else (810, 1080)
            assert 0 <= left <= left + width <= w + 1 and 0 <= top <= top + height <= h + 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert os.path.exists(tmp_path / "serve.log")
