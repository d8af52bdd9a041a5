"""The HTTP gateway (`spotline serve`), compatible with the seed's container:

    GET  /health   -> {"message": "health ok"}
    POST /identify {"instances": [{"key": 0, "caption": "...", "b64": "<base64 JPEG>"}, ...]}
                   -> {"predictions": [[left, top, width, height], ...]}  (instance order)

Instances that share an image are published as one frame with several captions. Bad input gets
a 4xx with a message that says what is wrong; a pipeline that does not answer in time, a 504.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..common.errors import InputError, SpotlineError, TransportError
from ..common.metrics import Metrics
from ..common.settings import Settings
from .client import Client, ResultTimeout
from .sources import check_frame, image_size

log = logging.getLogger(__name__)


class Instance(BaseModel):
    """One (image, caption) pair, as the competition harness sends it."""

    model_config = ConfigDict(extra="allow")
    key: int | str = Field(description="the caller's id for this pair")
    caption: str = Field(description="free text describing one object")
    b64: str = Field(description="base64 of the encoded image (JPEG/PNG)")


class IdentifyRequest(BaseModel):
    instances: list[Instance] = Field(min_length=1)


class IdentifyResponse(BaseModel):
    predictions: list[list[float]] = Field(
        description="one [left, top, width, height] per instance, in instance order")


class HttpError(SpotlineError):
    """An error with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_request(body: bytes, max_bytes: int) -> IdentifyRequest:
    """Validate the JSON body; every problem becomes an HttpError with a clear message."""
    if len(body) > max_bytes:
        raise HttpError(413, f"request body of {len(body)} bytes is over the {max_bytes} limit")
    try:
        return IdentifyRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HttpError(400, f"invalid request: {problems}") from None


def group_frames(req: IdentifyRequest, settings: Settings) -> list[tuple[bytes, list[int],
                                                                         list[str]]]:
    """(image bytes, instance indices, captions) per distinct image, in first-seen order."""
    frames: dict[str, tuple[bytes, list[int], list[str]]] = {}
    for i, inst in enumerate(req.instances):
        if inst.b64 not in frames:
            try:
                image = base64.b64decode(inst.b64, validate=True)
            except (binascii.Error, ValueError):
                raise HttpError(400, f"instances.{i}.b64: not valid base64") from None
            frames[inst.b64] = (image, [], [])
        frames[inst.b64][1].append(i)
        frames[inst.b64][2].append(inst.caption)
    for image, idx, captions in frames.values():
        try:
            check_frame(image, captions, settings)
            image_size(image, settings)
        except InputError as exc:
            raise HttpError(400, f"instances.{idx[0]}: {exc}") from None
    return list(frames.values())


def create_app(settings: Settings, client: Client, metrics: Metrics | None = None,
               timeout_s: float = 120.0) -> FastAPI:
    """The gateway application over a pipeline reached through ``client``."""
    metrics = metrics or Metrics()
    app = FastAPI(title="spotline gateway", version="1",
                  description="Visual grounding: the box each caption describes.")
    max_body = settings.max_frame_bytes * 2 + 1024 * 1024  # base64 inflates by 4/3

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"message": "health ok"}

    @app.post("/identify", response_model=IdentifyResponse, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": IdentifyRequest.model_json_schema()}}}})
    async def identify(request: Request) -> Any:
        t0 = time.perf_counter()
        body = await request.body()
        status, payload = await _run_identify(body)
        metrics.http_requests.labels("/identify", str(status)).inc()
        metrics.http_seconds.labels("/identify").observe(time.perf_counter() - t0)
        return JSONResponse(payload, status_code=status)

    async def _run_identify(body: bytes) -> tuple[int, dict[str, Any]]:
        from starlette.concurrency import run_in_threadpool

        try:
            req = parse_request(body, max_body)
            frames = group_frames(req, settings)
            predictions = await run_in_threadpool(_answer, req, frames)
            return 200, {"predictions": predictions}
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except ResultTimeout as exc:
            return 504, {"error": f"pipeline did not answer in {timeout_s:.0f}s: {exc}"}
        except TransportError as exc:
            return 503, {"error": f"pipeline unavailable: {exc}"}

    def _answer(req: IdentifyRequest, frames: list[tuple[bytes, list[int], list[str]]]
                ) -> list[list[float]]:
        ids = [(client.publish(image, captions, source_id="http"), idx)
               for image, idx, captions in frames]
        results = client.await_results([fid for fid, _ in ids], timeout=timeout_s)
        predictions: list[list[float]] = [[] for _ in req.instances]
        for fid, idx in ids:
            for i, box in zip(idx, results[fid].boxes, strict=True):
                predictions[i] = [float(v) for v in box]
        return predictions

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def crash_guard(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway error")
        return _error(500, f"internal error: {type(exc).__name__}")

    from .live import live_router  # GET /live: the live view (producer/live.py)
    app.include_router(live_router(settings, client))
    from .control import sources_router  # /sources: feeds at run time (producer/control.py)
    app.include_router(sources_router(settings, client))
    return app
