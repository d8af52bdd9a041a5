"""The gateway's live view in a real browser: Debian's chromium, headless, driven by Playwright
(its own browser download cannot work here, so executable_path points at the system one).

Frames are published through the real client (which stores the previews), their results are
written to the results stream the way the collector writes them (no model needed), and the page
must show each new frame, a box element per caption at the result's place, the stage latencies
and the source's drops, updated over server-sent events without a reload. A screenshot is saved
as a test artifact under out/test-artifacts/.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from spotline.common.codec import encode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Result
from spotline.common.settings import Settings
from spotline.common.transport import DATA_FIELD, FRAME_FIELD
from spotline.producer.client import Client
from tests.conftest import ROOT, uvicorn_gateway
from tests.faultlib import small_frame, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "out" / "test-artifacts"
BUS = next(iter(Path(__import__("ultralytics").__file__).parent.glob("assets/bus.jpg")), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make tools)")


@contextmanager
def serving(settings: Settings, url: str) -> Iterator[tuple[str, Client]]:
    """The real gateway under uvicorn, storing a preview of every frame: the test shows each."""
    with uvicorn_gateway(settings, url) as (base, client):
        client.previews.every_s = 0.0
        yield base, client


@pytest.fixture
def gateway(redis_server: EmbeddedRedis, settings: Settings) -> Iterator[tuple[str, Client]]:
    with serving(settings, redis_server.url) as served:
        yield served


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 760})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def collect(client: Client, fid: str, source: str, captions: tuple[str, ...],
            boxes: tuple[tuple[float, float, float, float], ...], scores: tuple[float, ...],
            size: tuple[int, int], **track: Any) -> Result:
    """Write a frame's result as the collector does, with a per-stage trace."""
    t0 = time.time() - 0.5
    trace = (("detect", t0, t0 + 0.01, t0 + 0.21), ("upscale", t0 + 0.22, t0 + 0.23, t0 + 0.30),
             ("score", t0 + 0.31, t0 + 0.33, t0 + 0.45), ("collect", t0 + 0.46, t0 + 0.47,
                                                          t0 + 0.48))
    result = Result(frame_id=fid, source_id=source, capture_time=t0 - 0.01, captions=captions,
                    boxes=boxes, scores=scores, image_size=size, trace=trace, **track)
    client.t.r.xadd(client.keys.results, {FRAME_FIELD: fid.encode(), DATA_FIELD: encode(result)})
    return result


def card(source: str) -> str:
    return f'.card[data-source="{source}"]'


def boxes_of(page: Any, source: str) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(f"{card(source)} .box", """els => els.map(e => ({
        caption: e.dataset.caption, track: e.dataset.track || null, label: e.innerText,
        left: parseFloat(e.style.left), top: parseFloat(e.style.top),
        width: parseFloat(e.style.width), height: parseFloat(e.style.height)}))""")


def test_live_page_shows_each_new_frame_with_a_box_per_caption(
        gateway: tuple[str, Client], page: Any) -> None:
    base, client = gateway
    image = BUS.read_bytes() if BUS else small_frame(1, 810, 1080)
    w, h = 810, 1080  # bus.jpg's size; small_frame makes the same
    fid = client.publish(image, ["red double-decker bus", "man in a dark jacket",
                                 "person on the right"], source_id="cam-north")
    collect(client, fid, "cam-north",
            ("red double-decker bus", "man in a dark jacket", "person on the right"),
            ((18.0, 228.0, 780.0, 520.0), (48.0, 398.0, 197.0, 506.0),
             (668.0, 388.0, 142.0, 490.0)), (0.91, 0.77, 0.64), (w, h),
            track_ids=(3, 7, -1))
    for _ in range(3):
        client.previews.count_drop("cam-north")
    fid3 = client.publish(small_frame(3), ["white van"], source_id="drone-7")
    collect(client, fid3, "drone-7", ("white van",), ((10.0, 20.0, 30.0, 40.0),), (0.8,),
            (320, 240))

    page.goto(f"{base}/live")
    page.wait_for_selector(f'{card("cam-north")}[data-frame="{fid}"]', timeout=20000)
    shown = boxes_of(page, "cam-north")
    assert [b["caption"] for b in shown] == ["red double-decker bus", "man in a dark jacket",
                                             "person on the right"]
    assert shown[0]["label"].startswith("red double-decker bus 0.91 #3")
    assert [b["track"] for b in shown] == ["3", "7", None]  # -1: no track
    assert shown[0]["left"] == pytest.approx(100 * 18 / w, abs=0.01)
    assert shown[0]["width"] == pytest.approx(100 * 780 / w, abs=0.01)
    assert shown[1]["top"] == pytest.approx(100 * 398 / h, abs=0.01)
    natural = page.eval_on_selector(f"{card('cam-north')} img", "i => i.naturalWidth")
    assert natural > 0  # the frame's preview really loaded
    stages = page.eval_on_selector_all(f"{card('cam-north')} td:first-child",
                                       "els => els.map(e => e.innerText)")
    assert stages[:4] == ["detect", "upscale", "score", "collect"]
    wait_for(lambda: "3 dropped" in page.inner_text(f"{card('cam-north')} .figures"), 10,
             "the drops on the page")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector(f'{card("drone-7")}[data-frame="{fid3}"]', timeout=20000)
    page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)

    # A new frame on the same source: the page follows over SSE, without a reload.
    fid2 = client.publish(small_frame(2, 640, 480), ["blue car"], source_id="cam-north")
    collect(client, fid2, "cam-north", ("blue car", "grey aircraft"),
            ((100.0, 120.0, 50.0, 40.0), (0.0, 0.0, 0.0, 0.0)), (0.55, 0.02), (640, 480),
            track_ids=(3, -1), absent=(False, True))  # track mode: "not in view"
    page.wait_for_selector(f'{card("cam-north")}[data-frame="{fid2}"]', timeout=20000)
    assert [b["caption"] for b in boxes_of(page, "cam-north")] == ["blue car"]
    assert "1 caption(s) without a box" in page.inner_text(f"{card('cam-north')} .nobox")
    assert [b["caption"] for b in boxes_of(page, "drone-7")] == ["white van"]
    page.screenshot(path=str(ARTIFACTS / "live-updated.png"))


def test_live_sources_and_frames_over_http(gateway: tuple[str, Client]) -> None:
    import httpx

    base, client = gateway
    fid = client.publish(small_frame(4), ["a"], source_id="cam/with/slashes")
    collect(client, fid, "cam/with/slashes", ("a",), ((1.0, 2.0, 3.0, 4.0),), (0.5,), (320, 240))
    with httpx.Client(base_url=base, timeout=10) as http:
        wait_for(lambda: any(s["frame_id"] == fid for s in http.get("/live/sources").json()),
                 20, "the source's state")
        (state,) = [s for s in http.get("/live/sources").json()
                    if s["source_id"] == "cam/with/slashes"]
        assert state["result"]["results"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
        assert [s["stage"] for s in state["stages"]] == ["detect", "upscale", "score", "collect"]
        assert state["stages"][0]["work_ms"] == pytest.approx(200, abs=1)
        img = http.get(state["image"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert img.content[:2] == b"\xff\xd8"
        assert http.get("/live/frames/cam/nothing.jpg").status_code == 404


def test_live_view_honours_the_api_keys(redis_server: EmbeddedRedis, settings: Settings,
                                        page: Any) -> None:
    import httpx

    keyed = settings.replace(api_keys="k-live-1:read")  # the read scope is all the page needs
    with serving(keyed, redis_server.url) as (base, client):
        fid = client.publish(small_frame(5), ["x"], source_id="cam-k")
        collect(client, fid, "cam-k", ("x",), ((5.0, 5.0, 20.0, 20.0),), (0.7,), (320, 240))
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/live").status_code == 200  # the page holds no data
            assert http.get("/live/sources").status_code == 401
            assert http.get("/live/sources", headers={"X-API-Key": "wrong"}).status_code == 401
            ok = http.get("/live/sources", headers={"X-API-Key": "k-live-1"})
            assert ok.status_code == 200
        page.goto(f"{base}/live")  # no key: the page asks for one and shows nothing
        page.wait_for_selector("#keyform:not([hidden])", timeout=20000)
        assert page.query_selector_all(".card") == []
        page.fill("#key", "k-live-1")
        page.click("#keyform button")
        page.wait_for_selector(f'{card("cam-k")}[data-frame="{fid}"] .box', timeout=20000)
        fresh = page.context.browser.new_context().new_page()  # no key stored in this one
        fresh.goto(f"{base}/live#key=k-live-1")  # a key in the fragment works too
        fresh.wait_for_selector(f'{card("cam-k")}[data-frame="{fid}"] .box', timeout=20000)
        assert "#key" not in fresh.url  # and leaves the address bar
        fresh.context.close()
        page.goto("about:blank")  # ends the event stream before the server stops
