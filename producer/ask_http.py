"""``GET /ask?caption=...&since=...`` and ``GET /sources/{id}/ask?caption=...``: ask the past
over HTTP (docs/ask.md).

The answer comes from an asker the application puts on ``app.state.asker`` (spotline/results/ask.py:
it holds the scorer's text tower, which the gateway's layer does not import); without one the
routes answer 503. Access is the live view's (producer/access.py): the guard lets in a key
with the ``read`` scope, and a key is answered only about the sources it may read (its own
/identify source and the operator's feeds; every source with ``admin``). A source it may not
read is a 404, as one that has no memory. The asker runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..common.errors import ConfigError, SpotlineError
from ..common.settings import Settings
from .access import Caller
from .guard import require

MAX_CAPTION = 200


def _since_s(since: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = since.strip().lower().removesuffix("in")  # 10min -> 10m
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text) * 60
    except (ValueError, IndexError):
        raise HTTPException(400, "since: a duration such as 90s, 10m or 1h") from None
    if not 0 < value <= 7 * 24 * 3600:
        raise HTTPException(400, "since must be more than 0 and at most a week")
    return value


def ask_router(settings: Settings) -> APIRouter:
    """The routes; the gateway includes them."""
    router = APIRouter(tags=["ask"])
    reader = Depends(require("read"))
    caption_q = Query(..., min_length=1, max_length=MAX_CAPTION)

    async def run(request: Request, caption: str, sources: list[str] | None, since: str,
                  limit: int) -> JSONResponse:
        asker = getattr(request.app.state, "asker", None)
        if asker is None:
            raise HTTPException(503, "asking the past is not available on this gateway "
                                     "(spotline serve provides it)")
        try:
            body: dict[str, Any] = await run_in_threadpool(asker, caption, sources,
                                                           _since_s(since), limit)
        except ConfigError as exc:
            raise HTTPException(400, str(exc)) from None
        except SpotlineError as exc:
            raise HTTPException(503, f"pipeline unavailable: {exc}") from None
        return JSONResponse(body)

    @router.get("/sources/{source_id}/ask",
                summary="Which of a source's tracks in the last minutes match a caption")
    async def ask_source(request: Request, source_id: str, caption: str = caption_q,
                         since: str = "10m", limit: int = Query(5, ge=1, le=100),
                         caller: Caller = reader) -> Any:
        if not caller.may_read(source_id):
            raise HTTPException(404, "no such source")
        return await run(request, caption, [source_id], since, limit)

    @router.get("/ask", summary="Which tracks of every readable source match a caption")
    async def ask_all(request: Request, caption: str = caption_q, since: str = "10m",
                      limit: int = Query(5, ge=1, le=100),
                      source: list[str] | None = Query(None),  # noqa: B008
                      caller: Caller = reader) -> Any:
        asker = getattr(request.app.state, "asker", None)
        known = await run_in_threadpool(asker.sources) if asker is not None else []
        wanted = [s for s in (source or known) if caller.may_read(s)]
        return await run(request, caption, wanted, since, limit)

    return router
