"""Publish a source's frames into a pipeline, with per-source backpressure.

``publish_source(source, client, settings)`` validates every frame (a frame that breaks the
limits is reported with its name and skipped as *rejected*), publishes it with its capture time
and original size, and watches the detect inbox's backlog (entries its group has not read yet).
When the backlog reaches ``settings.high_water`` the policy of the source decides:

- ``block`` (recorded footage: lose nothing): wait until the backlog falls below high water.
- ``drop-oldest`` (live feeds: stay current): keep reading the feed but hold only the newest
  frame locally; each newer frame replaces the held one, which is dropped and counted in
  ``spotline_frames_dropped_total{source, reason="backpressure"}``. The held frame goes out as
  soon as the backlog falls; one still held when the feed ends is dropped too.

The default policy is ``drop-oldest`` for live sources (cameras, streams) and the
``backpressure`` setting (``block`` unless configured) for everything else.

A live feed that is lost is retried inside the source (exponential backoff); when the retries
are spent, ``SourceFailed`` is raised, naming the feed and carrying the counts so far.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ..common.errors import InputError
from ..common.meta import check_meta
from ..common.metrics import Metrics
from ..common.settings import BACKPRESSURE, Settings
from .client import Client
from .sources import Source, SourceFrame, validate_frame

log = logging.getLogger(__name__)

BLOCK, DROP_OLDEST = BACKPRESSURE  # "block", "drop-oldest"
POLL_MIN_S = 0.005  # backlog polling while blocked: starts fast, backs off to POLL_MAX_S
POLL_MAX_S = 0.25
REPORT_EVERY_S = 10.0  # how often a blocked or dropping producer says so in the log


@dataclass
class PublishStats:
    """What happened to a source's frames."""

    published: int = 0
    dropped: int = 0  # backpressure drops (drop-oldest)
    errors: int = 0  # frames rejected by validation (corrupt, over a limit)
    frame_ids: list[str] = field(default_factory=list)  # unless keep_ids=False
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (frame name, reason)
    total: int | None = None  # frames the source announced, when known
    read: int = 0  # frames taken from the source and handled (published, dropped, rejected)
    blocked_s: float = 0.0  # time spent waiting for the backlog to fall

    def summary(self) -> str:
        """One line for humans."""
        return (f"{self.published} published, {self.dropped} dropped (backpressure), "
                f"{self.errors} rejected" + (f", blocked {self.blocked_s:.1f}s"
                                              if self.blocked_s >= 0.05 else ""))


class SourceFailed(InputError):
    """A source stopped with an error after it was opened (a live feed lost for good, a video
    that yields no frames). ``stats`` holds what was published before."""

    def __init__(self, message: str, stats: PublishStats) -> None:
        super().__init__(message)
        self.stats = stats


def default_policy(source: Source, settings: Settings) -> str:
    """drop-oldest for live sources, else the ``backpressure`` setting."""
    return DROP_OLDEST if source.live else settings.backpressure


@dataclass
class _Publisher:
    source: Source
    client: Client
    settings: Settings
    policy: str
    metrics: Metrics | None
    stop: threading.Event | None
    on_published: Callable[[SourceFrame, str], None] | None
    stats: PublishStats = field(default_factory=PublishStats)
    keep_ids: bool = True
    meta: dict[str, Any] | None = None  # every frame's (checked once, by publish_source)
    held: tuple[SourceFrame, tuple[int, int]] | None = None  # drop-oldest: newest waiting
    _last_report: float = 0.0

    @property
    def sid(self) -> str:
        return self.source.source_id

    # --- backpressure ------------------------------------------------------------------------
    def backlog(self) -> int:
        return self.client.backlog()

    def over_high_water(self) -> bool:
        return self.backlog() >= self.settings.high_water

    def wait_below_high_water(self) -> bool:
        """Block until the inbox backlog is under high water; False when stopped meanwhile."""
        backlog = self.backlog()
        if backlog < self.settings.high_water:
            return True
        started = time.monotonic()
        delay = POLL_MIN_S
        log.log(logging.DEBUG if self.stats.blocked_s else logging.INFO,
                "%s: detect inbox backlog %d >= high_water %d; waiting (policy block)",
                self.sid, backlog, self.settings.high_water)
        try:
            while backlog >= self.settings.high_water:
                if self.stop is None:
                    time.sleep(delay)
                elif self.stop.wait(delay):
                    return False
                delay = min(POLL_MAX_S, delay * 2)
                backlog = self.backlog()
                self._report_blocked(backlog, time.monotonic() - started)
        finally:
            self.stats.blocked_s += time.monotonic() - started
        return True

    def _report_blocked(self, backlog: int, waited: float) -> None:
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S:
            return
        self._last_report = now
        alive = self.client.workers_alive()
        log.warning("%s: still waiting after %.0fs: detect backlog %d >= high_water %d%s",
                    self.sid, waited, backlog, self.settings.high_water,
                    "" if alive else " (no detect worker is running)")

    # --- frames ------------------------------------------------------------------------------
    def validate(self, frame: SourceFrame) -> tuple[int, int] | None:
        """The frame's (width, height), or None after reporting it as rejected."""
        try:
            return validate_frame(frame.image, frame.captions, self.settings)
        except InputError as exc:
            self.stats.errors += 1
            self.stats.rejected.append((frame.name, str(exc)))
            log.warning("%s: frame %s rejected: %s", self.sid, frame.name, exc)
            if self.metrics is not None:
                self.metrics.frames_dropped.labels(self.metrics.source(self.sid), "rejected").inc()
            self.client.previews.count_drop(self.sid, "rejected")  # for the live view
            return None

    def publish(self, frame: SourceFrame, size: tuple[int, int]) -> None:
        fid = self.client.publish(frame.image, frame.captions, source_id=frame.source_id,
                                  capture_time=frame.capture_time, image_size=size,
                                  meta=self.meta)
        self.stats.published += 1
        if self.keep_ids:
            self.stats.frame_ids.append(fid)
        if self.on_published is not None:
            self.on_published(frame, fid)

    def handle(self, frame: SourceFrame) -> bool:
        """Validate, then publish, hold or drop one frame; False when stopped while blocked."""
        size = self.validate(frame)
        if size is None:
            return True
        if self.policy == BLOCK:
            if not self.wait_below_high_water():
                return False
            self.publish(frame, size)
            return True
        if self.held is not None:  # a newer frame came while the older one waited
            self.drop(self.held[0])
            self.held = None
        if self.over_high_water():
            self.held = (frame, size)
        else:
            self.publish(frame, size)
        return True

    def finish(self) -> None:
        """Send the frame still held (drop-oldest) if the backlog allows, else drop it."""
        if self.held is None:
            return
        frame, size = self.held
        self.held = None
        if self.over_high_water():
            self.drop(frame)
        else:
            self.publish(frame, size)

    def drop(self, frame: SourceFrame) -> None:
        self.stats.dropped += 1
        if self.metrics is not None:
            self.metrics.frames_dropped.labels(self.metrics.source(frame.source_id),
                                               "backpressure").inc()
        self.client.previews.count_drop(frame.source_id, "dropped")  # for the live view
        now = time.monotonic()
        if self.stats.dropped == 1 or now - self._last_report >= REPORT_EVERY_S:
            self._last_report = now
            log.warning("%s: dropped frame %s (detect backlog >= high_water %d); %d dropped so "
                        "far (policy drop-oldest)", self.sid, frame.name,
                        self.settings.high_water, self.stats.dropped)


def _frames(source: Source, max_frames: int | None, skip: int) -> Iterator[SourceFrame]:
    """The source's frames after the first ``skip``, at most ``max_frames`` of them; closes
    the source at the end (also when the caller stops early)."""
    it = iter(source)
    try:
        for _ in range(skip):
            if next(it, None) is None:
                return
        n = 0
        while max_frames is None or n < max_frames:
            frame = next(it, None)
            if frame is None:
                return
            n += 1
            yield frame
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        source.close()


def publish_source(source: Source, client: Client, settings: Settings,
                   policy: str | None = None, progress: bool = True,
                   metrics: Metrics | None = None, *, max_frames: int | None = None,
                   skip: int = 0, stop: threading.Event | None = None,
                   on_progress: Callable[[PublishStats], None] | None = None,
                   on_published: Callable[[SourceFrame, str], None] | None = None,
                   stats: PublishStats | None = None, keep_ids: bool = True,
                   meta: dict[str, Any] | None = None) -> PublishStats:
    """Publish every frame of ``source`` (opened) through ``client``; returns the counts.

    ``policy``: block or drop-oldest (default: see ``default_policy``). ``max_frames``: stop
    after reading that many frames (live feeds run forever otherwise); ``skip``: leave out the
    first frames (a retried job resumes); ``stop``: an event that ends publishing early.
    ``on_progress(stats)`` runs after every frame read, ``on_published(frame, frame_id)`` after
    every frame published. ``stats``: count into this object (a caller keeps the counts when
    publishing raises); ``keep_ids=False`` leaves ``stats.frame_ids`` empty (a feed that runs
    for days); ``meta``: a JSON object every frame carries and its result returns unchanged
    (checked before the first frame: InputError, nothing published). Raises ``SourceFailed``
    when the source breaks while being read and ``TransportError`` when Redis stays
    unreachable.
    """
    policy = policy or default_policy(source, settings)
    if policy not in BACKPRESSURE:
        raise InputError(f"policy must be one of {BACKPRESSURE}, got {policy!r}")
    meta = check_meta(meta, settings.meta_max_bytes)
    stats = stats if stats is not None else PublishStats()
    if metrics is not None:  # the client counts what it publishes (frames_published) there
        client.metrics = metrics
    pub = _Publisher(source, client, settings, policy, client.metrics, stop, on_published, stats,
                     keep_ids, meta)
    total = source.total
    stats.total = max(0, total - skip) if total is not None else None
    if max_frames is not None and stats.total is not None:
        stats.total = min(stats.total, max_frames)
    bar = tqdm(total=stats.total, disable=not progress, unit="frame", desc=source.source_id,
               leave=True, dynamic_ncols=True)
    try:
        for frame in _frames(source, max_frames, skip):
            going = pub.handle(frame)
            stats.read += 1  # after handling: a retry resumes after the frames fully handled
            bar.update(1)
            if progress and (stats.dropped or stats.errors):
                bar.set_postfix(dropped=stats.dropped, rejected=stats.errors, refresh=False)
            if on_progress is not None:
                on_progress(stats)
            if not going or (stop is not None and stop.is_set()):
                break
    except InputError as exc:
        pub.finish()
        raise SourceFailed(f"{source.source_id}: {exc} (after {stats.summary()})",
                           stats) from exc
    finally:
        bar.close()
    pub.finish()
    if on_progress is not None:
        on_progress(stats)
    return stats
