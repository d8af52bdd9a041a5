"""``GET /results/events``: the results stream over HTTP as server-sent events, for subscribers
that hold no Redis credentials (a web page, a service behind the gateway).

Each event is one result: ``event: result``, ``id:`` the results stream's entry id, ``data:`` the
result's JSON (docs/results.md, the same JSON every sink sends). A client that reconnects sends
the last id it saw as ``Last-Event-ID`` (EventSource does so by itself) and gets every result
after it that the stream still holds (``results_maxlen``): it misses nothing across a dropped
connection or a gateway restart. Without it the stream starts with new results
(``?start=all``: everything the stream still holds). ``?source=ID`` (repeatable) keeps only those
sources.

Access is the live view's (producer/access.py): the guard lets in a key with the ``read`` scope,
and a key sees only the sources it may read (its own /identify source and the operator's feeds;
every source with ``admin``). Redis is read through the Transport (XREAD, no consumer group: it
only looks), in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from ..common.codec import decode
from ..common.envelope import Result
from ..common.errors import DecodeError, SpotlineError
from ..common.settings import Settings
from ..common.transport import DATA_FIELD, Transport
from .access import Caller
from .client import Client
from .guard import require

EVENT = "result"
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
BLOCK_MS = 1000  # one XREAD waits at most this long, then the connection is checked
BATCH = 200


def start_id(transport: Transport, last_event_id: str | None, start: str) -> str:
    """Where a connection starts reading: after ``Last-Event-ID``, at the stream's start
    (``start=all``), or after its newest entry (new results only)."""
    if last_event_id:
        if not STREAM_ID.match(last_event_id):
            raise HTTPException(400, f"Last-Event-ID {last_event_id[:40]!r} is not a results "
                                     "stream id (such as 1700000000000-0)")
        return last_event_id
    if start == "all":
        return "0-0"
    return transport.last_id(transport.keys.results)


def result_event(entry_id: str, fields: dict[bytes, bytes],
                 keep: Callable[[Result], bool]) -> dict[str, str] | None:
    """The SSE event of one results stream entry, or None (not a result, or filtered out)."""
    try:
        result = decode(fields.get(DATA_FIELD, b""))
    except DecodeError:
        return None
    if not isinstance(result, Result) or not keep(result):
        return None
    try:
        data = json.dumps(result.as_json(), separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN box: not JSON (sinks dead-letter it; here it is skipped)
        return None
    return {"event": EVENT, "id": entry_id, "data": data}


def results_router(settings: Settings, client: Client) -> APIRouter:
    """The route; the gateway includes it."""
    transport = Transport(settings, url=client.t.url) if client.t.url else client.t
    router = APIRouter(tags=["results"])
    reader = Depends(require("read"))

    @router.get("/results/events", summary="Server-sent events: every result, resumable with "
                "Last-Event-ID (docs/results.md)")
    async def events(request: Request, caller: Caller = reader,
                     source: list[str] | None = Query(None),  # noqa: B008
                     start: str = Query("new", pattern="^(new|all)$")) -> Any:
        from sse_starlette.sse import EventSourceResponse

        wanted = set(source or [])

        def keep(result: Result) -> bool:
            return caller.may_read(result.source_id) and (
                not wanted or result.source_id in wanted)

        last_event_id = (request.headers.get("last-event-id")
                         or request.query_params.get("last_event_id"))
        try:
            after = await run_in_threadpool(start_id, transport, last_event_id, start)
        except SpotlineError as exc:
            raise HTTPException(503, f"pipeline unavailable: {exc}") from None
        return EventSourceResponse(_stream(transport, request, after, keep), ping=15, sep="\n")

    return router


async def _stream(transport: Transport, request: Request, after: str,
                  keep: Callable[[Result], bool]) -> AsyncIterator[dict[str, str]]:
    """Results after ``after``, as they come, until the client goes."""
    while not await request.is_disconnected():
        rows = await run_in_threadpool(transport.tail, transport.keys.results, after, BATCH,
                                       BLOCK_MS)
        for entry_id, fields in rows:
            after = entry_id
            event = result_event(entry_id, fields, keep)
            if event is not None:
                yield event
