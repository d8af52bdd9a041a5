"""Stream control: feeds added and removed at run time (`spotline sources add|list|remove`, and
``/sources`` on the gateway), run by supervisors (`spotline sources run`).

The registry is a Redis hash (``keys.sources``: source id -> JSON spec). A supervisor watches
it: every feed in it runs in a thread of exactly one supervisor (a lease key with a TTL,
renewed while it runs, so several supervisors share the feeds and one that dies hands its feeds
to the others when the lease runs out), and stops within a second or so of being removed.

Each feed reports its state in ``keys.source_status``: ``starting``, ``running``, ``stalled``
(no frame for ``stall_s``), ``reconnecting`` (it failed; retried with exponential backoff),
``finished`` (a file or folder read to its end), ``stopped``; with the last frame's time, the
frames published, dropped and rejected, reconnects (the source's own reopen attempts plus the
supervisor's restarts) and the last error. A live feed that cannot be opened or is lost is
retried for ever, with a backoff that grows to ``max_backoff_s``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from ..common.errors import InputError, SpotlineError
from ..common.redact import redact as redact_text
from ..common.settings import BACKPRESSURE, Settings
from ..common.transport import Transport
from .client import Client
from .feedpolicy import FeedPolicy, FeedRefused
from .publisher import PublishStats, publish_source
from .sources import (
    DatasetSource,
    FolderSource,
    Reconnect,
    Source,
    SourceFrame,
    open_source,
    redact,
)

log = logging.getLogger(__name__)

# fullmatch, never '$' (which lets one trailing newline through: "cam1\n" beside "cam1")
SOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
ORIGINS = ("host", "http")  # who registered a feed: the host's CLI/API, or the gateway
STATES = ("starting", "running", "stalled", "reconnecting", "finished", "stopped")

# Renew a lease only while we still hold it (KEYS[1] lease; ARGV owner, ttl ms).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class FeedSpec:
    """A feed to run: what `spotline publish` takes, kept in the registry."""

    source_id: str
    spec: str  # RTSP/HTTP URL, camera index, video, folder, image or dataset path
    captions: tuple[str, ...] = ()
    fps: float | None = None
    live: bool = False  # read a video file as a live stream (loops, drops when behind)
    policy: str | None = None  # block or drop-oldest; default: drop-oldest for live feeds
    # "http": added over the gateway, so bound by the feed policy (producer/feedpolicy.py)
    # when added and again each time the supervisor opens it; "host": the operator's own
    origin: str = "host"

    def __post_init__(self) -> None:
        if not isinstance(self.source_id, str) or not SOURCE_ID.fullmatch(self.source_id):
            raise InputError(f"source id {self.source_id!r}: letters, digits and . _ / - only "
                             "(up to 128), starting with a letter or digit")
        if not self.spec.strip():
            raise InputError("empty source spec")
        if self.fps is not None and self.fps <= 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        if self.policy is not None and self.policy not in BACKPRESSURE:
            raise InputError(f"policy must be one of {BACKPRESSURE}, got {self.policy!r}")
        if any(not isinstance(c, str) or not c.strip() for c in self.captions):
            raise InputError("captions must be non-empty strings")
        if self.origin not in ORIGINS:
            raise InputError(f"origin must be one of {ORIGINS}, got {self.origin!r}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "captions": list(self.captions)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> FeedSpec:
        data = json.loads(raw)
        data["captions"] = tuple(data.get("captions") or ())
        # an entry that does not say who added it (an older spotline wrote it) may have come
        # over HTTP: it is held to the policy (re-add it with the CLI to run it unbound)
        data.setdefault("origin", "http")
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """The spec for listings: credentials in URLs are not shown."""
        return {**json.loads(self.to_json()), "spec": redact(self.spec)}


@dataclass
class FeedStatus:
    """What a supervisor reports about one feed."""

    state: str = "starting"
    owner: str = ""
    last_frame_time: float | None = None
    published: int = 0
    dropped: int = 0
    rejected: int = 0
    reconnects: int = 0
    restarts: int = 0
    error: str | None = None
    running_since: float | None = None
    updated: float = field(default_factory=time.time)


class Registry:
    """The feed registry and statuses in Redis (what add/list/remove and the HTTP API use)."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self.keys = transport.keys

    def add(self, feed: FeedSpec, replace: bool = False, limit: int = 0) -> bool:
        """Register a feed; False when the id exists (and ``replace`` is not set). ``limit``:
        FeedRefused when the registry holds that many feeds already (checked atomically)."""
        if limit:
            return self._add_within(feed, limit)
        return self.t.set_field(self.keys.sources, feed.source_id, feed.to_json(),
                                only_new=not replace)

    def _add_within(self, feed: FeedSpec, limit: int) -> bool:
        """Add the feed only while the registry holds fewer than ``limit`` feeds (checked
        atomically: a concurrent add makes the check look again)."""
        added = self.t.set_field_within(self.keys.sources, feed.source_id, feed.to_json(),
                                        limit)
        if added < 0:
            FeedPolicy(max_feeds=limit).check_count(limit)
        return added > 0

    def remove(self, source_id: str) -> bool:
        """Unregister a feed (its supervisor stops it within a poll); False when unknown."""
        removed = self.t.delete_fields([(self.keys.sources, source_id),
                                        (self.keys.source_status, source_id)])
        return bool(removed[0])

    def feeds(self) -> dict[str, FeedSpec]:
        out = {}
        for sid, raw in self.t.fields(self.keys.sources).items():
            try:
                out[sid] = FeedSpec.from_json(raw)
            except (ValueError, TypeError, SpotlineError) as exc:
                log.error("source %s: unreadable registry entry (%s); ignored", sid,
                          redact_text(str(exc)))
        return out

    def statuses(self) -> dict[str, FeedStatus]:
        """Each feed's last reported status (one that does not parse, from an older version,
        is left out: it is rewritten within a poll)."""
        out = {}
        for sid, raw in self.t.fields(self.keys.source_status).items():
            try:
                out[sid] = FeedStatus(**json.loads(raw))
            except (ValueError, TypeError):
                continue
        return out

    def report(self, source_id: str, status: FeedStatus) -> None:
        status.updated = time.time()
        self.t.set_field(self.keys.source_status, source_id, json.dumps(asdict(status)))

    def forget(self, source_id: str) -> None:
        self.t.delete_fields([(self.keys.source_status, source_id)])

    def listing(self) -> list[dict[str, Any]]:
        """Every registered feed with its status (JSON-friendly), by id."""
        feeds, statuses = self.feeds(), self.statuses()
        rows = []
        for sid in sorted(feeds):
            status = statuses.get(sid)
            rows.append({**feeds[sid].public(),
                         "status": asdict(status) if status else {"state": "pending"}})
        return rows


class _Feed:
    """One feed running in a thread: open, publish, and on failure retry with backoff."""

    def __init__(self, sup: Supervisor, spec: FeedSpec) -> None:
        self.sup = sup
        self.spec = spec
        self.status = FeedStatus(owner=sup.owner)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"feed-{spec.source_id}")
        self._source_reconnects = 0

    def start(self) -> _Feed:
        self.thread.start()
        return self

    def _set(self, **changes: Any) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(self.status, k, v)

    def snapshot(self) -> FeedStatus:
        with self.lock:
            return FeedStatus(**asdict(self.status))

    def _run(self) -> None:
        delay = self.sup.base_backoff_s
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                finished = self._publish_once()
            except Exception as exc:  # noqa: BLE001 - any failure of a feed is retried
                msg = redact_text(str(exc)) or type(exc).__name__
                if time.monotonic() - started > 2 * self.sup.max_backoff_s:
                    delay = self.sup.base_backoff_s  # it ran a good while: start over
                self._set(state="reconnecting", error=msg,
                          restarts=self.status.restarts + 1)
                log.warning("source=%s failed (%s); retrying in %.1fs", self.spec.source_id,
                            msg, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.sup.max_backoff_s)
                continue
            self._set(state="finished" if finished else "stopped")
            return
        self._set(state="stopped")

    def _publish_once(self) -> bool:
        """Open and publish until the source ends (True) or the feed is stopped (False)."""
        self._set(state="starting")
        reconnect = Reconnect(max_attempts=self.sup.source_attempts,
                              base_delay=self.sup.base_backoff_s,
                              max_delay=self.sup.max_backoff_s, sleep=self.stop.wait)
        guard = self._guard()
        if guard is not None:
            guard()  # again now, not only when it was added: links and DNS answers change
        source = self._confine(open_source(self.spec.spec, self.spec.captions,
                                           self.spec.source_id, self.spec.fps,
                                           reconnect=reconnect, live=self.spec.live,
                                           guard=guard))
        self._set(state="running", error=None, running_since=time.time())
        stats = PublishStats()
        base = self.snapshot()

        def progress(s: PublishStats) -> None:
            self._set(published=base.published + s.published, dropped=base.dropped + s.dropped,
                      rejected=base.rejected + s.errors,
                      reconnects=self._source_reconnects + getattr(source, "reconnects", 0))

        def published(_frame: SourceFrame, _fid: str) -> None:
            self._set(last_frame_time=time.time())
            if self.status.state == "stalled":
                self._set(state="running")

        try:
            publish_source(source, self.sup.client, self.sup.settings, self.spec.policy,
                           progress=False, stop=self.stop, on_progress=progress,
                           on_published=published, stats=stats, keep_ids=False)
        finally:
            self._source_reconnects += getattr(source, "reconnects", 0)
            progress(stats)
            source.close()
        return not self.stop.is_set()

    def _guard(self) -> Any:
        """For a feed added over HTTP: the policy check to run before each connection."""
        if self.spec.origin != "http":
            return None
        policy, spec = self.sup.policy, self.spec.spec
        return lambda: policy.check_target(spec)

    def _confine(self, source: Source) -> Source:
        """A folder or dataset added over HTTP: only its files inside feed_roots (a link in
        it may point anywhere)."""
        if self.spec.origin != "http":
            return source
        inside = self.sup.policy.inside_roots
        if isinstance(source, FolderSource):
            source.files = [f for f in source.files if inside(f)]
            left = len(source.files)
        elif isinstance(source, DatasetSource):
            source.images = [i for i in source.images if inside(i.image_path)]
            left = len(source.images)
        else:
            return source
        if not left:
            source.close()
            raise FeedRefused(f"{self.spec.spec}: no images inside feed_roots")
        return source


class Supervisor:
    """Runs the registered feeds this process holds the lease of, until stopped."""

    def __init__(self, settings: Settings, client: Client, *, poll_s: float = 1.0,
                 lease_s: float = 15.0, stall_s: float = 10.0, base_backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, source_attempts: int = 5) -> None:
        self.settings = settings
        self.client = client
        self.t = client.t
        self.registry = Registry(client.t)
        self.poll_s = poll_s
        self.lease_ms = int(lease_s * 1000)
        self.stall_s = stall_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.source_attempts = source_attempts
        self.policy = FeedPolicy.from_settings(settings)  # for feeds added over HTTP
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.feeds: dict[str, _Feed] = {}
        self._stop = threading.Event()
        self._renew = self.t.script(_RENEW)
        self._release = self.t.script(_RELEASE)

    def stop(self, *_args: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        log.info("sources supervisor %s running", self.owner)
        try:
            while not self._stop.is_set():
                self.step()
                self._stop.wait(self.poll_s)
        finally:
            self.shutdown()

    def step(self) -> None:
        """One round: start what is new (and not held elsewhere), stop what was removed,
        renew leases, report every feed held here."""
        wanted = self.registry.feeds()
        done = {sid for sid, st in self.registry.statuses().items() if st.state == "finished"}
        for sid in list(self.feeds):
            feed = self.feeds[sid]
            if sid not in wanted or wanted[sid] != feed.spec or not self._renew_lease(sid):
                self._end(sid, forget=sid not in wanted)
        for sid, spec in wanted.items():
            # A finished file is not read again (remove and add it to re-read it); a finished
            # feed stays held (its lease renewed) by the supervisor that ran it.
            if sid not in self.feeds and sid not in done and self._take_lease(sid):
                log.info("source=%s starting (%s, added from the %s)", sid, redact(spec.spec),
                         spec.origin)
                self.feeds[sid] = _Feed(self, spec).start()
        for sid, feed in list(self.feeds.items()):
            status = feed.snapshot()
            if status.state == "running" and self._stalled(status):
                feed._set(state="stalled")
                status.state = "stalled"
            self.registry.report(sid, status)

    def _stalled(self, status: FeedStatus) -> bool:
        last = max(status.last_frame_time or 0.0, status.running_since or 0.0)
        return time.time() - last > self.stall_s

    def _take_lease(self, sid: str) -> bool:
        key = self.t.keys.source_lease(sid)
        return self.t.set_value(key, self.owner, ttl_ms=self.lease_ms, only_new=True)

    def _renew_lease(self, sid: str) -> bool:
        key = self.t.keys.source_lease(sid)
        return bool(self.t.call(lambda: self._renew(keys=[key],
                                                    args=[self.owner, self.lease_ms]), "lease"))

    def _end(self, sid: str, forget: bool) -> None:
        """Stop a feed and wait for its thread; it leaves ``feeds`` last, once it is done."""
        feed = self.feeds[sid]
        feed.stop.set()
        feed.thread.join(10)
        if feed.thread.is_alive():
            log.warning("source=%s did not stop within 10s (a read is blocking)", sid)
        self.t.call(lambda: self._release(keys=[self.t.keys.source_lease(sid)],
                                          args=[self.owner]), "release")
        if forget:
            self.registry.forget(sid)
        else:
            self.registry.report(sid, feed.snapshot())
        del self.feeds[sid]
        log.info("source=%s stopped", sid)

    def shutdown(self) -> None:
        for sid in list(self.feeds):
            self._end(sid, forget=False)


class FeedRequest(BaseModel):
    """A feed to add over HTTP (the body of ``POST /sources``)."""

    model_config = ConfigDict(extra="forbid")
    source_id: str = Field(description="unique id: letters, digits, . _ / -")
    spec: str = Field(description="RTSP/HTTP URL, camera index, or a path on the supervisor")
    captions: list[str] = Field(default_factory=list, description="what to look for")
    fps: float | None = Field(default=None, description="frames per second at most")
    live: bool = Field(default=False, description="read a video file as a live stream")
    policy: str | None = Field(default=None, description="block or drop-oldest")


def sources_router(settings: Settings, client: Client) -> APIRouter:
    """``/sources``: list, add and remove feeds (run by `spotline sources run`). Every method
    needs the ``admin`` scope, checked by the gateway's guard before the body is read
    (producer/guard.py) and again here."""
    from .guard import require

    registry = Registry(client.t)
    policy = FeedPolicy.from_settings(settings)
    router = APIRouter(tags=["sources"], dependencies=[Depends(require("admin"))])

    @router.get("/sources", summary="Registered feeds with their state")
    def list_sources() -> list[dict[str, Any]]:
        return registry.listing()

    @router.post("/sources", status_code=201, summary="Add a feed (run by a supervisor)")
    def add_source(body: FeedRequest) -> dict[str, Any]:
        try:
            feed = FeedSpec(body.source_id, body.spec, tuple(body.captions), body.fps,
                            body.live, body.policy, origin="http")
            policy.check_request(feed.spec, feed.captions)
            added = registry.add(feed, limit=policy.max_feeds)
        except FeedRefused as exc:
            log.warning("POST /sources refused: %s", redact_text(str(exc)))
            raise HTTPException(exc.status, str(exc)) from None
        except InputError as exc:
            raise HTTPException(400, redact_text(str(exc))) from None
        if not added:
            raise HTTPException(409, f"source {feed.source_id!r} exists; remove it first")
        return feed.public()

    @router.delete("/sources/{source_id:path}", status_code=204, summary="Remove a feed")
    def remove_source(source_id: str) -> Response:
        if not registry.remove(source_id):
            raise HTTPException(404, f"no source {source_id!r}")
        return Response(status_code=204)

    return router
