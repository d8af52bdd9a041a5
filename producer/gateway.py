"""The HTTP gateway (`spotline serve`), compatible with the seed's container:

    GET  /health   -> {"message": "health ok"}           (open: is the process up)
    GET  /ready    -> 200, or 503 listing what is missing (open: Redis and a live worker with
                      its model loaded for every stage)
    GET  /metrics  -> Prometheus text                      (open)
    POST /identify {"instances": [{"key": 0, "caption": "...", "b64": "<base64 JPEG>"}, ...]}
                   -> {"predictions": [[left, top, width, height], ...]}  (instance order)

Instances that share an image are published as one frame with several captions. Bad input gets
a 4xx with a message that says what is wrong (also an image the pipeline cannot decode: 422
naming the instance); a pipeline that does not answer in time, a 504. A body over the limit is
refused from its Content-Length, or, chunked, as soon as the bytes read pass the limit: it is
never held whole. /identify needs an API key when keys are configured, and is rate-limited per
key (producer/access.py).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common.errors import InputError, SpotlineError, TransportError
from ..common.metrics import Metrics
from ..common.settings import Settings
from ..common.topology import pipeline
from .access import Access
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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) from its Content-Length before reading, or while it streams in
    as soon as the bytes read pass ``max_bytes``: memory never holds more than the limit."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HttpError(400, f"invalid Content-Length {length[:40]!r}")
        if int(length) > max_bytes:
            raise HttpError(413, f"request body of {int(length)} bytes is over the {max_bytes}"
                                 f"-byte limit")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise HttpError(413, f"request body is over the {max_bytes}-byte limit (stopped "
                                 f"reading at {total} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


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


READY_WITHIN_S = 15.0  # a worker whose last heartbeat is older is not live (workers beat 5 s)


def readiness(settings: Settings, client: Client) -> list[str]:
    """What keeps the pipeline from answering: Redis not answering, or a stage without a live
    worker that has loaded its model (workers beat only once set up). Empty when ready."""
    t = client.t
    try:  # no retry loops: a probe answers now
        t.ping()
        alive = {stage: t.workers_alive(stage, READY_WITHIN_S, retry=False)
                 for stage in pipeline(settings)}
    except Exception as exc:  # noqa: BLE001 - any failure to reach Redis is "not ready"
        return [f"redis: {type(exc).__name__}: {exc}"]
    return [f"{stage}: no live worker with its model loaded (no heartbeat in "
            f"{READY_WITHIN_S:.0f}s)" for stage, n in alive.items() if n < 1]


class Identify:
    """POST /identify: read and check the body, publish a frame per distinct image, wait for
    the results; every outcome is a (status, JSON payload)."""

    def __init__(self, settings: Settings, client: Client, timeout_s: float) -> None:
        self.settings = settings
        self.client = client
        self.timeout_s = timeout_s
        self.max_body = settings.max_frame_bytes * 2 + 1024 * 1024  # base64 inflates by 4/3

    async def run(self, request: Request) -> tuple[int, dict[str, Any]]:
        from starlette.concurrency import run_in_threadpool

        try:
            req = parse_request(await read_body(request, self.max_body), self.max_body)
            frames = group_frames(req, self.settings)
            predictions = await run_in_threadpool(self.answer, req, frames)
            return 200, {"predictions": predictions}
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except ResultTimeout as exc:
            return 504, {"error": f"pipeline did not answer in {self.timeout_s:.0f}s: {exc}"}
        except TransportError as exc:
            return 503, {"error": f"pipeline unavailable: {exc}"}

    def answer(self, req: IdentifyRequest, frames: list[tuple[bytes, list[int], list[str]]]
               ) -> list[list[float]]:
        # The seed's images are unrelated: never numbered as a video (track mode answers them
        # per frame).
        ids = [(self.client.publish(image, captions, source_id="http", sequenced=False), idx)
               for image, idx, captions in frames]
        results = self.client.await_results([fid for fid, _ in ids], timeout=self.timeout_s)
        failed = [(idx, results[fid].error) for fid, idx in ids if results[fid].error]
        if failed:  # the pipeline answered these frames with an error result
            raise pipeline_error(failed)
        predictions: list[list[float]] = [[] for _ in req.instances]
        for fid, idx in ids:
            for i, box in zip(idx, results[fid].boxes, strict=True):
                predictions[i] = [float(v) for v in box]
        return predictions


def create_app(settings: Settings, client: Client, metrics: Metrics | None = None,
               timeout_s: float = 120.0) -> FastAPI:
    """The gateway application over a pipeline reached through ``client``."""
    metrics = metrics or Metrics()
    app = FastAPI(title="spotline gateway", version="1",
                  description="Visual grounding: the box each caption describes.")
    access = Access(settings, client.t)
    app.state.access = access  # other routers guard themselves with Depends(app.state.access)
    handler = Identify(settings, client, timeout_s)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"message": "health ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        missing = readiness(settings, client)
        return JSONResponse({"ready": not missing, "missing": missing},
                            status_code=503 if missing else 200)

    @app.post("/identify", response_model=IdentifyResponse, dependencies=[Depends(access)],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": IdentifyRequest.model_json_schema()}}}})
    async def identify(request: Request) -> Any:
        t0 = time.perf_counter()
        status, payload = await handler.run(request)
        metrics.http_requests.labels("/identify", str(status)).inc()
        metrics.http_seconds.labels("/identify").observe(time.perf_counter() - t0)
        # a refused body may not have been read: close rather than parse what follows
        headers = {"Connection": "close"} if status == 413 else None
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    from .live import live_router  # GET /live: the live view (producer/live.py)
    app.include_router(live_router(settings, client))
    from .control import sources_router  # /sources: feeds at run time (producer/control.py)
    app.include_router(sources_router(settings, client))
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error answer is JSON ``{"error": "..."}`` (401, 404, 429 from FastAPI included)."""
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash_guard(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway error")
        return _error(500, f"internal error: {type(exc).__name__}")


def pipeline_error(failed: list[tuple[list[int], str | None]]) -> HttpError:
    """The answer for frames the pipeline failed: 422 naming the instances when their input was
    bad (an image that does not decode), else 502."""
    bad_input = all("InputError" in (reason or "") for _, reason in failed)
    what = "; ".join(f"instances.{','.join(map(str, idx))}: {reason}" for idx, reason in failed)
    if bad_input:
        return HttpError(422, f"the pipeline could not use the input: {what}")
    return HttpError(502, f"the pipeline failed: {what}")
