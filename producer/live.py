"""The live view of the gateway: ``GET /live``, a page that shows, per source, the latest frame
with its result drawn on it (a box per caption with caption, score and track id when there is
one), the per-stage latency of that frame, the source's results per second and its drops, kept
current over server-sent events.

Where the pictures come from: the pipeline keeps no image after detect, so producers store a
small JPEG of a sampled frame per source (producer/previews.py). This module follows the results
stream (XREAD, no consumer group: it only looks), and when a result's frame has a preview, that
frame with that result becomes the source's shown frame. Every result updates the source's
figures. Memory is bounded: one shown frame per source, at most ``max_sources`` sources (the
least recently updated is forgotten), a bounded window of arrival times.

Routes (the data ones need a key with the ``read`` scope when the gateway has keys, and show
only the sources that key may read: its own /identify source and the operator's feeds, or every
source with ``admin`` too; producer/access.py):
    GET /live                               the page (plain HTML, no build, no CDN; open: it
                                            holds no data, and asks for a key when needed)
    GET /live/static/{live.js,live.css}     its script and style (a strict CSP: no inline code)
    GET /live/sources                       the readable sources' states, JSON
    GET /live/events                        SSE: event ``source`` with one source's state (and
                                            its frame as a data URL when it is new to the page)
    GET /live/frames/{source}/{frame}.jpg   a frame's JPEG, only under the source it belongs to
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..common.codec import decode
from ..common.envelope import Result
from ..common.errors import DecodeError, SpotlineError
from ..common.settings import Settings
from ..common.transport import DATA_FIELD, Transport
from .access import Caller
from .client import Client
from .guard import require
from .previews import Previews

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE = STATIC / "live.html"
ASSETS = {"live.js": "text/javascript; charset=utf-8", "live.css": "text/css; charset=utf-8"}
# The page's own script and style only (no inline code), images from itself or data: URLs.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
FPS_WINDOW_S = 5.0
DROPS_EVERY_S = 1.0
SEED_RESULTS = 200  # results read back at start, so the page is not empty until the next one


@dataclass
class SourceView:
    """What the page shows of one source."""

    source_id: str
    frame_id: str | None = None  # the shown frame (has a preview)
    result: dict[str, Any] | None = None  # its result, Result.as_json()
    jpeg: bytes | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float | None = None  # capture -> result of the shown frame
    results: int = 0
    errors: int = 0
    dropped: int = 0
    rejected: int = 0
    last_result: float = 0.0  # unix time of the latest result (shown or not)
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def fps(self, now: float) -> float:
        while self.arrivals and now - self.arrivals[0] > FPS_WINDOW_S:
            self.arrivals.popleft()
        return len(self.arrivals) / FPS_WINDOW_S

    def state(self, now: float) -> dict[str, Any]:
        image = (f"/live/frames/{quote(self.source_id, safe='')}/{self.frame_id}.jpg"
                 if self.frame_id else None)
        return {"source_id": self.source_id, "frame_id": self.frame_id, "image": image,
                "result": self.result, "stages": self.stages, "latency_ms": self.latency_ms,
                "fps": round(self.fps(now), 2), "results": self.results, "errors": self.errors,
                "dropped": self.dropped, "rejected": self.rejected,
                "last_result": self.last_result}


def stage_times(result: Result) -> list[dict[str, Any]]:
    """Per stage of one frame: time queued before it and time in it, in milliseconds."""
    return [{"stage": stage, "queue_ms": round(max(0.0, start - enq) * 1000, 1),
             "work_ms": round(max(0.0, end - start) * 1000, 1)}
            for stage, enq, start, end in result.trace]


class _Listener:
    """One SSE connection: the sources changed since it last sent (coalesced: bounded)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 may_read: Callable[[str], bool] = lambda _source: True) -> None:
        self.loop = loop
        self.may_read = may_read
        self.dirty: set[str] = set()
        self.sent: dict[str, str] = {}  # source -> the frame whose image it has sent
        self.event = asyncio.Event()

    def mark(self, source_id: str) -> None:  # runs on the listener's loop
        if self.may_read(source_id):
            self.dirty.add(source_id)
            self.event.set()


class LiveState:
    """Follows the results stream in a thread and keeps each source's view."""

    def __init__(self, transport: Transport, max_sources: int = 256) -> None:
        self.t = transport
        self.previews = Previews(transport)
        self.max_sources = max_sources
        self.sources: OrderedDict[str, SourceView] = OrderedDict()
        self.lock = threading.Lock()
        self.listeners: set[_Listener] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------
    def ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="live")
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        last = self._seed()
        next_drops = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_drops:
                    next_drops = time.monotonic() + DROPS_EVERY_S
                    self._refresh_drops()
                for entry_id, fields in self.t.tail(self.t.keys.results, last, 500, 500):
                    last = entry_id
                    self._on_entry(fields)
            except SpotlineError as exc:  # Redis gone longer than reconnect_max_s
                log.warning("live view: %s; retrying", exc)
                self._stop.wait(1.0)

    def _seed(self) -> str:
        rows = self.t.recent(self.t.keys.results, SEED_RESULTS)
        for _entry_id, fields in reversed(rows):
            self._on_entry(fields, seeding=True)
        return rows[0][0] if rows else "0-0"

    # --- updates -------------------------------------------------------------------------
    def _on_entry(self, fields: dict[bytes, bytes], seeding: bool = False) -> None:
        try:
            result = decode(fields.get(DATA_FIELD, b""))
        except DecodeError:
            return
        if isinstance(result, Result):
            self.update(result, arrived=None if seeding else time.time())

    def update(self, result: Result, arrived: float | None = None) -> None:
        """Take one result: figures always; the shown frame when its preview exists."""
        jpeg = self.previews.get(result.frame_id, result.source_id)
        with self.lock:
            view = self._view(result.source_id)
            view.results += 1
            view.errors += result.error is not None
            view.last_result = max(view.last_result, result.finished_time)
            if arrived is not None:
                view.arrivals.append(arrived)
            if jpeg is not None:
                view.frame_id, view.jpeg = result.frame_id, jpeg
                view.result = result.as_json()
                view.stages = stage_times(result)
                view.latency_ms = round(result.latency * 1000, 1)
        self._notify(result.source_id)

    def _view(self, source_id: str) -> SourceView:
        view = self.sources.get(source_id)
        if view is None:
            view = self.sources[source_id] = SourceView(source_id)
            while len(self.sources) > self.max_sources:
                self.sources.popitem(last=False)
        self.sources.move_to_end(source_id)
        return view

    def _refresh_drops(self) -> None:
        changed = []
        for source_id, counts in self.previews.drops().items():
            with self.lock:
                view = self.sources.get(source_id)
                if view is None and len(self.sources) >= self.max_sources:
                    continue
                view = view or self._view(source_id)
                if (view.dropped, view.rejected) != (counts["dropped"], counts["rejected"]):
                    view.dropped, view.rejected = counts["dropped"], counts["rejected"]
                    changed.append(source_id)
        for source_id in changed:
            self._notify(source_id)

    def _notify(self, source_id: str) -> None:
        for listener in list(self.listeners):
            try:
                listener.loop.call_soon_threadsafe(listener.mark, source_id)
            except RuntimeError:  # its loop is closed
                self.listeners.discard(listener)

    # --- reads ---------------------------------------------------------------------------
    def state(self, source_id: str) -> dict[str, Any] | None:
        with self.lock:
            view = self.sources.get(source_id)
            return view.state(time.time()) if view else None

    def all_states(self, may_read: Callable[[str], bool] = lambda _source: True
                   ) -> list[dict[str, Any]]:
        """The states of the sources ``may_read`` lets through, by id."""
        now = time.time()
        with self.lock:
            return [v.state(now) for v in sorted(self.sources.values(),
                                                 key=lambda v: v.source_id)
                    if may_read(v.source_id)]

    def frame(self, source_id: str, frame_id: str) -> bytes | None:
        """The JPEG of a frame of this source (None when it is another source's frame)."""
        with self.lock:
            view = self.sources.get(source_id)
            if view is not None and view.frame_id == frame_id:
                return view.jpeg
        # a frame shown a moment ago, while its TTL lasts: its record names its source
        return self.previews.get(frame_id, source_id)


def live_router(settings: Settings, client: Client) -> APIRouter:
    """The live view's routes; the gateway includes them."""
    transport = Transport(settings, url=client.t.url) if client.t.url else client.t
    live = LiveState(transport)
    router = APIRouter(tags=["live view"], on_shutdown=[live.stop])
    reader = Depends(require("read"))

    @router.get("/live", response_class=HTMLResponse, summary="Live view page")
    def page() -> HTMLResponse:
        live.ensure_started()
        return HTMLResponse(PAGE.read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": PAGE_CSP,
                                     "Cache-Control": "no-store"})

    @router.get("/live/static/{name}", summary="The live page's script and style")
    def asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed list: never a path from the request
            raise HTTPException(404, f"no {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=ASSETS[name],
                        headers={"Cache-Control": "no-cache"})

    @router.get("/live/sources", summary="The latest frame and figures of every source this "
                "key may read")
    def sources(caller: Caller = reader) -> JSONResponse:
        live.ensure_started()
        return JSONResponse(live.all_states(caller.may_read))

    @router.get("/live/frames/{source_id:path}/{frame_id}.jpg",
                summary="A shown frame (JPEG), under its own source")
    def frame(source_id: str, frame_id: str, caller: Caller = reader) -> Response:
        jpeg = live.frame(source_id, frame_id) if caller.may_read(source_id) else None
        if jpeg is None:  # unknown, expired, another source's, or not this key's to read
            raise HTTPException(404, f"no frame {frame_id} of {source_id} (expired?)")
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60"})

    @router.get("/live/events", summary="Server-sent events: event 'source', one per update")
    async def events(request: Request, caller: Caller = reader) -> Any:
        from sse_starlette.sse import EventSourceResponse

        live.ensure_started()
        listener = _Listener(asyncio.get_running_loop(), caller.may_read)
        live.listeners.add(listener)
        return EventSourceResponse(_stream(live, listener, request), ping=15, sep="\n")

    return router


async def _stream(live: LiveState, listener: _Listener,
                  request: Request) -> AsyncIterator[dict[str, str]]:
    """Every source's state at once, then each source again when it changes. A state carries
    its frame as a data URL (``image_data``) the first time this connection sees that frame, so
    the page makes no further (authenticated) requests."""
    try:
        for state in live.all_states(listener.may_read):
            yield _event(live, listener, state)
        while not await request.is_disconnected():
            try:
                await asyncio.wait_for(listener.event.wait(), timeout=5.0)
            except TimeoutError:
                continue
            listener.event.clear()
            dirty, listener.dirty = listener.dirty, set()
            for source_id in sorted(dirty):
                state = live.state(source_id)
                if state is not None:
                    yield _event(live, listener, state)
    finally:
        live.listeners.discard(listener)


def _event(live: LiveState, listener: _Listener, state: dict[str, Any]) -> dict[str, str]:
    import base64
    import json

    source, frame = state["source_id"], state["frame_id"]
    if frame and listener.sent.get(source) != frame:
        jpeg = live.frame(source, frame)
        if jpeg is not None:
            state["image_data"] = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
            listener.sent[source] = frame
    return {"event": "source", "data": json.dumps(state)}
