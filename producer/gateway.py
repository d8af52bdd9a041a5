"""The HTTP gateway (`spotline serve`), compatible with the seed's container:

    GET  /health   -> {"message": "health ok"}           (open: is the process up; an open
                      gateway adds "auth": "open (loopback)" or "open (insecure)")
    GET  /ready    -> 200, or 503 listing what is missing (open: Redis and a live worker with
                      its model loaded for every stage)
    GET  /metrics  -> Prometheus text                      (open)
    POST /identify {"instances": [{"key": 0, "caption": "...", "b64": "<base64 JPEG>"}, ...]}
                   -> {"predictions": [[left, top, width, height], ...]}  (instance order)
                   optional "meta": a JSON object every frame of the request carries and
                   its result returns unchanged (docs/results.md; 400 when it is not one)
    GET  /results/events -> every result as server-sent events (producer/results_http.py)

Instances that share an image are published as one frame with several captions, at most
``identify_max_instances`` instances and ``identify_max_images`` distinct images a request
(413 over either). Bad input gets a 4xx with a message that says what is wrong (also an image
the pipeline cannot decode: 422 naming the instance); a pipeline that does not answer in time,
a 504. Parsing, base64 decoding and header checks run in a worker thread, never on the event
loop. Each key's frames are published as its own source (producer/access.py: tenants), and the
key's rate limit is charged a token per distinct image.

Every request first passes the guard (producer/guard.py): Host allow-list, API key and scope
before the body is read, JSON content type, and a body limit enforced while it streams in.
Safe by default: bound to loopback with no keys the gateway is open (and says so); bound
elsewhere with no keys it refuses to start unless ``insecure_open_gateway`` is set.
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

from ..common.errors import ConfigError, InputError, SpotlineError, TransportError
from ..common.meta import check_meta
from ..common.metrics import Metrics
from ..common.settings import Settings
from ..common.topology import pipeline
from .access import Access, Caller, KeyRing, Refused, is_loopback
from .client import Client, ResultTimeout
from .guard import Guard, check_length, require
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
    meta: dict[str, Any] | None = Field(None, description=(
        "a JSON object returned unchanged on every frame's result (docs/results.md); at most "
        "meta_max_bytes as JSON"))


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
    as soon as the bytes read pass ``max_bytes``: memory never holds more than the limit.
    The header check is the guard's (Refused, answered as the guard's are)."""
    check_length(request.headers.get("content-length"), max_bytes)
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


def check_caps(req: IdentifyRequest, settings: Settings, max_cost: int | None) -> None:
    """Instances and distinct images per request within the settings (and distinct images
    within the key's burst, when rate limited: a request it could never pay for); 413."""
    if len(req.instances) > settings.identify_max_instances:
        raise HttpError(413, f"{len(req.instances)} instances in one request; at most "
                             f"{settings.identify_max_instances} (identify_max_instances)")
    images = len({inst.b64 for inst in req.instances})
    if images > settings.identify_max_images:
        raise HttpError(413, f"{images} distinct images in one request; at most "
                             f"{settings.identify_max_images} (identify_max_images)")
    if max_cost is not None and images > max_cost:
        raise HttpError(413, f"{images} distinct images in one request; this key's rate "
                             f"limit takes at most {max_cost} at once (rate_burst)")


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


Frames = list[tuple[bytes, list[int], list[str]]]


class Identify:
    """POST /identify: read and check the body, publish a frame per distinct image, wait for
    the results; every outcome is a (status, JSON payload)."""

    def __init__(self, settings: Settings, client: Client, access: Access,
                 timeout_s: float) -> None:
        self.settings = settings
        self.client = client
        self.access = access
        self.timeout_s = timeout_s
        self.max_body = identify_max_bytes(settings)

    async def run(self, request: Request, caller: Caller) -> tuple[int, dict[str, Any]]:
        from starlette.concurrency import run_in_threadpool

        try:
            body = await read_body(request, self.max_body)
            req, frames = await run_in_threadpool(self.prepare, body)
            predictions = await run_in_threadpool(self.answer, req, frames, caller)
            return 200, {"predictions": predictions}
        except HttpError as exc:
            return exc.status, {"error": str(exc)}
        except Refused as exc:
            return exc.status, {"error": str(exc), "headers": exc.headers}
        except ResultTimeout as exc:
            return 504, {"error": f"pipeline did not answer in {self.timeout_s:.0f}s: {exc}"}
        except TransportError as exc:
            return 503, {"error": f"pipeline unavailable: {exc}"}

    def prepare(self, body: bytes) -> tuple[IdentifyRequest, Frames]:
        """Parse, cap, decode and check: CPU work, run in a worker thread."""
        req = parse_request(body, self.max_body)
        check_caps(req, self.settings, self.access.max_cost())
        try:
            check_meta(req.meta, self.settings.meta_max_bytes)
        except InputError as exc:
            raise HttpError(400, f"invalid request: {exc}") from None
        return req, group_frames(req, self.settings)

    def answer(self, req: IdentifyRequest, frames: Frames, caller: Caller
               ) -> list[list[float]]:
        # A token per distinct image: the guard took one for the request, the rest here.
        if len(frames) > 1:
            self.access.admit(caller, len(frames) - 1)
        # The seed's images are unrelated: never numbered as a video (track mode answers them
        # per frame). Each key's frames are its own source: only it (and admin) sees them.
        ids = [(self.client.publish(image, captions, source_id=caller.source,
                                    sequenced=False, meta=req.meta), idx)
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


def identify_max_bytes(settings: Settings) -> int:
    """The /identify body limit: two frames' worth of base64 (it inflates by 4/3) + 1 MiB."""
    return settings.max_frame_bytes * 2 + 1024 * 1024


def exposure(settings: Settings, keys: KeyRing, host: str) -> str:
    """How the gateway is reachable: "keys", "open (loopback)" or "open (insecure)". Raises
    ConfigError for an open gateway on another address than loopback without
    ``insecure_open_gateway``."""
    if keys.configured:
        return "keys"
    if is_loopback(host):
        log.warning("no API keys configured (api_keys / api_keys_file): the gateway on %s is "
                    "OPEN to every local user and program (fine for local development)", host)
        return "open (loopback)"
    if not settings.insecure_open_gateway:
        raise ConfigError(
            f"refusing to serve an open gateway on {host}: with no API keys anyone who can "
            f"reach that address could add feeds and read every frame. Set api_keys or "
            f"api_keys_file (SPOTLINE_API_KEYS=KEY:identify+read+admin), bind to 127.0.0.1 "
            f"(--host / http_host), or accept the risk with insecure_open_gateway "
            f"(SPOTLINE_INSECURE_OPEN_GATEWAY=true)")
    log.warning("INSECURE: no API keys and insecure_open_gateway is set: the gateway on %s is "
                "OPEN to anyone who can reach it (every route, /sources included)", host)
    return "open (insecure)"


def create_app(settings: Settings, client: Client, metrics: Metrics | None = None,
               timeout_s: float = 120.0, host: str | None = None) -> FastAPI:
    """The gateway application over a pipeline reached through ``client``, to be served on
    ``host`` (default: http_host; an open gateway elsewhere than loopback is a ConfigError
    unless insecure_open_gateway). Frames the gateway publishes are counted (by the client) on
    ``metrics``, the registry /metrics serves, as ``via="gateway"``."""
    if metrics is not None:
        client.metrics = metrics
    metrics = client.metrics
    client.via = "gateway"
    host = host or settings.http_host
    access = Access(settings, client.t)
    mode = exposure(settings, access.keys, host)
    app = FastAPI(title="spotline gateway", version="1",
                  description="Visual grounding: the box each caption describes.")
    app.state.access = access
    app.add_middleware(Guard, access=access, settings=settings, bind_host=host,
                       identify_max_bytes=identify_max_bytes(settings))
    handler = Identify(settings, client, access, timeout_s)
    health_body = {"message": "health ok"} if mode == "keys" else {"message": "health ok",
                                                                    "auth": mode}

    @app.get("/health")
    def health() -> dict[str, str]:
        return health_body

    @app.get("/ready")
    def ready() -> JSONResponse:
        missing = readiness(settings, client)
        return JSONResponse({"ready": not missing, "missing": missing},
                            status_code=503 if missing else 200)

    @app.post("/identify", response_model=IdentifyResponse,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": IdentifyRequest.model_json_schema()}}}})
    async def identify(request: Request,
                       caller: Caller = Depends(require("identify"))) -> Any:  # noqa: B008
        t0 = time.perf_counter()
        status, payload = await handler.run(request, caller)
        metrics.http_requests.labels("/identify", str(status)).inc()
        metrics.http_seconds.labels("/identify").observe(time.perf_counter() - t0)
        headers = payload.pop("headers", None)
        # a refused body may not have been read: close rather than parse what follows
        if status == 413:
            headers = {**(headers or {}), "Connection": "close"}
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    _openapi_keys(app)
    from .live import live_router  # GET /live: the live view (producer/live.py)
    app.include_router(live_router(settings, client))
    from .control import sources_router  # /sources: feeds at run time (producer/control.py)
    app.include_router(sources_router(settings, client))
    from .results_http import results_router  # GET /results/events (producer/results_http.py)
    app.include_router(results_router(settings, client))
    from .ask_http import ask_router  # GET /ask, /sources/{id}/ask (producer/ask_http.py)
    app.include_router(ask_router(settings))
    return app


def _openapi_keys(app: FastAPI) -> None:
    """The OpenAPI page shows how to send a key (the guard reads it: producer/guard.py)."""
    from fastapi.openapi.utils import get_openapi

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)
            spec.setdefault("components", {})["securitySchemes"] = {
                "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "an API key (scopes: docs/security.md)"},
                "HTTPBearer": {"type": "http", "scheme": "bearer",
                               "description": "an API key as a bearer token"}}
            spec["security"] = [{"APIKeyHeader": []}, {"HTTPBearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


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
