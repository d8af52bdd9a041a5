"""The live view's "ask the past" box in a real browser (headless chromium, as tests/test_live.py):
the page asks the shown sources with its key and draws the matching track on the stored
preview of its frame, under the page's strict CSP (no inline code, data: images only)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import uvicorn

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.settings import Settings
from spotline.common.trackmemory import MemoryStore
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from spotline.results.ask import Asker
from spotline.stages import memory
from tests.faultlib import small_frame, wait_for
from tests.test_live import CHROMIUM, card, collect, page  # noqa: F401  (page: a fixture)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make tools)")


def test_search_box_draws_the_answer_on_a_stored_preview(redis_server: EmbeddedRedis,
                                                         settings: Settings,
                                                         page: Any) -> None:  # noqa: F811
    s = settings.replace(api_keys="k-ask:read")
    client = Client.connect(redis_server.url, s)
    client.previews.every_s = 0.0  # a preview of every frame
    fid = client.publish(small_frame(3), ["x"], source_id="cam-a")
    collect(client, fid, "cam-a", ("x",), ((10.0, 10.0, 40.0, 30.0),), (0.7,), (320, 240))
    vec = np.eye(8, dtype=np.float32)[2]
    store = MemoryStore.for_settings(s, client.t)
    memory.Recorder(store).record("cam-a", 1, time.time(), np.array([[80, 60, 160, 120]]),
                                  np.array([4]), {4: vec}, frame_id=fid)
    app = create_app(s, client)
    app.state.asker = Asker(s, client.t, scorer=lambda caption, e: e @ vec)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "the gateway")
        page.goto(f"http://127.0.0.1:{port}/live#key=k-ask")
        page.wait_for_selector(f'{card("cam-a")}[data-frame="{fid}"] .box', timeout=20000)
        page.fill("#caption", "a blue van")
        page.click("#askform button")
        page.wait_for_selector('#answers .card[data-track="cam-a#4"] .view .box', timeout=20000)
        box = page.eval_on_selector('#answers .card[data-track="cam-a#4"] .view .box', """e => ({
            left: parseFloat(e.style.left), top: parseFloat(e.style.top),
            width: parseFloat(e.style.width), height: parseFloat(e.style.height)})""")
        # the box in the source's frame size (320x240), as a share of the preview
        assert box == pytest.approx({"left": 25.0, "top": 25.0, "width": 25.0, "height": 25.0})
        src = page.get_attribute('#answers .card[data-track="cam-a#4"] img', "src")
        assert src is not None and src.startswith("data:image/jpeg")
        assert "1 track(s)" in page.inner_text("#askmsg")
        page.goto("about:blank")  # ends the event stream before the server stops
    finally:
        server.should_exit = True
        thread.join(10)
        client.close()
