"""GET /results/events: the results stream as server-sent events, against the real gateway (as a
`spotline serve` process, killed and started again, and in-process under uvicorn) and a real
redis-server. Results are written to the results stream the way the collector writes them (no
model needed); a plain client (httpx, streaming) must get each one once, in order, across a
gateway restart, and see only the sources its key may read; a real browser's EventSource (Debian's
chromium, headless) must receive a result."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.settings import Settings
from spotline.common.transport import Transport
from spotline.producer.access import tenant_source
from tests.conftest import spotline_serve, uvicorn_gateway
from tests.test_sinks import make_result, publish_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEYS = "k-op:read+admin,k-alice,k-bob,k-writer:identify"


def read_events(lines: Iterator[str], n: int) -> list[dict[str, Any]]:
    """The next ``n`` events from an open SSE response's lines (``resp.iter_lines()``, taken
    once): {"event", "id", "data" (parsed)}."""
    events: list[dict[str, Any]] = []
    event: dict[str, Any] = {}
    for line in lines:
        if not line:
            if "data" in event:
                events.append(event)
                if len(events) == n:
                    return events
            event = {}
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            event["data"] = json.loads(value)
        elif name in ("event", "id"):
            event[name] = value
    raise AssertionError(f"the stream ended after {len(events)} of {n} events")


def test_a_client_resumes_with_last_event_id_through_a_gateway_restart(
        redis_server: EmbeddedRedis, settings: Settings, transport: Transport,
        tmp_path: Path) -> None:
    s = settings.replace(api_keys=KEYS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = [make_result(i, source="cam-1") for i in range(6)]
    during = [make_result(i, source="cam-1") for i in range(6, 14)]
    after = [make_result(i, source="cam-1") for i in range(14, 18)]
    publish_results(transport, first)
    headers = {"X-API-Key": "k-alice"}
    with spotline_serve(s, redis_server.url, tmp_path / "serve.log", port=port,
                        stop=signal.SIGKILL) as (_, proc), \
            httpx.Client(base_url=base, timeout=20) as http, \
            http.stream("GET", "/results/events?start=all", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        got = read_events(resp.iter_lines(), 4)
        proc.send_signal(signal.SIGKILL)  # the gateway dies mid-stream
    last_id = got[-1]["id"]
    publish_results(transport, during)  # published while no gateway runs
    with spotline_serve(s, redis_server.url, tmp_path / "serve.log", port=port,
                        stop=signal.SIGKILL), \
            httpx.Client(base_url=base, timeout=20) as http, \
            http.stream("GET", "/results/events",
                        headers={**headers, "Last-Event-ID": last_id}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got += read_events(lines, 2 + len(during))
        publish_results(transport, after)  # and new ones arrive live on the same stream
        got += read_events(lines, len(after))
    frames = [e["data"]["frame_id"] for e in got]
    assert frames == [r.frame_id for r in first + during + after], "each once, in order"
    ids = [e["id"] for e in got]
    stream_ids = [i for i, _f in transport.entries(transport.keys.results)]
    assert ids == stream_ids  # the event id is the results stream's entry id
    assert all(e["event"] == "result" and e["data"]["schema"] == "spotline.result/v1"
               for e in got)


def frames_seen(http: httpx.Client, key: str, n: int, query: str = "") -> list[str]:
    with http.stream("GET", f"/results/events?start=all{query}",
                     headers={"X-API-Key": key}) as resp:
        assert resp.status_code == 200, resp.read()
        return [e["data"]["frame_id"] for e in read_events(resp.iter_lines(), n)]


def test_keys_scopes_and_tenants(redis_server: EmbeddedRedis, settings: Settings,
                                 transport: Transport) -> None:
    """No key: 401; a key without read: 403; a key sees its own /identify source and the
    operator's feeds, never another key's; admin sees all; ?source= filters."""
    alice, bob = tenant_source("k-alice"), tenant_source("k-bob")
    results = [make_result(0, alice), make_result(1, bob), make_result(2, "cam-op"),
               make_result(3, alice), make_result(4, bob), make_result(5, "cam-op")]
    publish_results(transport, results)
    with uvicorn_gateway(settings.replace(api_keys=KEYS), redis_server.url) as (base, _), \
            httpx.Client(base_url=base, timeout=20) as http:
        assert http.get("/results/events").status_code == 401
        assert http.get("/results/events", headers={"X-API-Key": "nope"}).status_code == 401
        denied = http.get("/results/events", headers={"X-API-Key": "k-writer"})
        assert denied.status_code == 403 and "read" in denied.json()["error"]
        bad = http.get("/results/events", headers={"X-API-Key": "k-alice",
                                                    "Last-Event-ID": "yesterday"})
        assert bad.status_code == 400
        assert frames_seen(http, "k-alice", 4) == ["frame0000", "frame0002", "frame0003",
                                                   "frame0005"]
        assert frames_seen(http, "k-bob", 4) == ["frame0001", "frame0002", "frame0004",
                                                 "frame0005"]
        assert frames_seen(http, "k-op", 6) == [r.frame_id for r in results]
        assert frames_seen(http, "k-op", 2, f"&source={bob}") == ["frame0001", "frame0004"]
        first_id = transport.entries(transport.keys.results)[0][0]  # resume by query too
        assert frames_seen(http, "k-op", 2, f"&last_event_id={first_id}") == ["frame0001",
                                                                              "frame0002"]
        # another tenant's source asked for by name: still nothing of it
        publish_results(transport, [make_result(6, "cam-op")])
        assert frames_seen(http, "k-alice", 1, f"&source={bob}&source=cam-op") == [
            "frame0002"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make tools)")
def test_a_browser_event_source_receives_results(redis_server: EmbeddedRedis,
                                                 settings: Settings,
                                                 transport: Transport) -> None:
    """EventSource sends no custom header: it reads an open (loopback) gateway as is, the way
    docs/results.md describes; the result arrives as the documented JSON with its meta."""
    from playwright.sync_api import sync_playwright

    from tests.test_live import CHROMIUM_ARGS

    telemetry = {"lat": 1.352083, "lon": 103.819836, "alt_m": 120.5}
    with uvicorn_gateway(settings, redis_server.url) as (base, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        page = browser.new_page()
        page.goto(f"{base}/live")  # a page of the gateway's origin (its CSP: connect-src self)
        page.evaluate("""() => {
            window.got = [];
            window.events = new EventSource("/results/events?source=drone-7");
            window.events.addEventListener("result", (e) =>
                window.got.push({id: e.lastEventId, result: JSON.parse(e.data)}));
        }""")
        page.wait_for_function("() => window.events.readyState === 1", timeout=20000)
        publish_results(transport, [make_result(0, "cam-other"),
                                    make_result(1, "drone-7").replace(meta=telemetry)])
        page.wait_for_function("() => window.got.length >= 1", timeout=20000)
        got = page.evaluate("() => { window.events.close(); return window.got; }")
        browser.close()
    assert len(got) == 1
    assert got[0]["result"]["frame_id"] == "frame0001"
    assert got[0]["result"]["meta"] == telemetry
    assert got[0]["id"] == transport.entries(transport.keys.results)[-1][0]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make tools)")
def test_a_browser_on_a_keyed_gateway_reads_with_fetch_and_the_key(
        redis_server: EmbeddedRedis, settings: Settings, transport: Transport) -> None:
    """With keys, a bare EventSource is refused (it cannot send the key); the page reads the
    same stream with fetch() and X-API-Key, as the live view does (docs/results.md)."""
    from playwright.sync_api import sync_playwright

    from tests.test_live import CHROMIUM_ARGS

    publish_results(transport, [make_result(0, "cam-op")])
    with uvicorn_gateway(settings.replace(api_keys=KEYS), redis_server.url) as (base, _), \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        page = browser.new_page()
        page.goto(f"{base}/live")
        refused = page.evaluate("""() => new Promise((done) => {
            const es = new EventSource("/results/events?start=all");
            es.onerror = () => { done(es.readyState); es.close(); };
            es.addEventListener("result", () => done("got a result"));
        })""")
        got = page.evaluate("""async () => {
            const resp = await fetch("/results/events?start=all",
                                     {headers: {"X-API-Key": "k-alice"}});
            const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
            let text = "";
            while (!text.includes("\\n\\n")) text += (await reader.read()).value;
            await reader.cancel();
            return {status: resp.status, text};
        }""")
        browser.close()
    assert refused == 2  # CLOSED: the 401 ends it, no result leaks
    assert got["status"] == 200
    fields = dict(line.split(": ", 1) for line in got["text"].strip().splitlines())
    assert fields["event"] == "result" and json.loads(fields["data"])["frame_id"] == "frame0000"
