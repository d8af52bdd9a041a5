"""Prometheus metrics. Each process (worker, collector, gateway, producer) has its own registry
and serves ``/metrics`` on its own port: no multiprocess mode.

Histogram buckets span 0.5 ms (a Redis hop) to 120 s (a real-size SigLIP batch on a CPU).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from .topology import pipeline
from .transport import Transport

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SIZE_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2.5e7)
COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class Metrics:
    """Every series spotline exports, on one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "spotline_stage_seconds", "Time per entry in a stage, by phase", ["stage", "phase"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_seconds = Histogram(
            "spotline_end_to_end_seconds", "Capture time to published result", ["source"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "spotline_batch_size", "Entries per model call", ["stage"], buckets=BATCH_BUCKETS,
            registry=r)
        self.crops_per_frame = Histogram(
            "spotline_crops_per_frame", "Detected boxes per frame", buckets=COUNT_BUCKETS,
            registry=r)
        self.entry_bytes = Histogram(
            "spotline_entry_bytes", "Size of entries written, by target stream", ["stream"],
            buckets=SIZE_BUCKETS, registry=r)
        self.entries = Counter(
            "spotline_entries", "Entries handled by stage and outcome (ok, error, retried, "
            "dead, duplicate)", ["stage", "outcome"], registry=r)
        self.reclaimed = Counter(
            "spotline_reclaimed_entries", "Stale entries taken over from dead consumers",
            ["stage"], registry=r)
        self.results = Counter(
            "spotline_results_published", "Results published, by outcome (ok, error, fallback)",
            ["outcome"], registry=r)
        self.dead_letters = Counter(
            "spotline_dead_letters", "Entries moved to the dead-letter stream", ["stage"],
            registry=r)
        self.frames_published = Counter(
            "spotline_frames_published", "Frames published by producers", ["source"],
            registry=r)
        self.frames_dropped = Counter(
            "spotline_frames_dropped", "Frames dropped by producers", ["source", "reason"],
            registry=r)
        self.redis_outages = Counter(
            "spotline_redis_outages", "Redis connection outages survived", registry=r)
        self.backlog = Gauge(
            "spotline_stream_backlog", "Entries not yet read by the stream's group", ["stream"],
            registry=r)
        self.pending = Gauge(
            "spotline_stream_pending", "Entries read but not acknowledged", ["stream"],
            registry=r)
        self.workers_alive = Gauge(
            "spotline_workers_alive", "Consumers with a recent heartbeat", ["stage"], registry=r)
        self.threads = Gauge(
            "spotline_stage_threads", "Threads the stage's model runs on (threads_policy "
            "follow: the count asked, or the export's own where it keeps one)", ["stage"],
            registry=r)
        self.model_loaded = Gauge(
            "spotline_model_loaded", "1 when the stage's model is loaded", ["stage", "model",
                                                                              "device"],
            registry=r)
        self.model_precision = Gauge(
            "spotline_model_precision", "1 for the precision each model of the stage runs at, "
            "and why (export_precision auto: fastest, not-faster, drift-refused, only-fp32; "
            "set; torch)", ["model", "precision", "reason"], registry=r)
        self.http_requests = Counter(
            "spotline_http_requests", "Gateway requests by route and status", ["route", "status"],
            registry=r)
        self.http_seconds = Histogram(
            "spotline_http_request_seconds", "Gateway request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=r)
        # track mode (stages/track.py)
        self.tracks_alive = Gauge(
            "spotline_tracks_alive", "Tracks followed in a source's last frame", ["source"],
            registry=r)
        self.track_crops = Counter(
            "spotline_track_crops", "Boxes of tracked frames: crop embedded, or the track's "
            "cached embedding reused", ["outcome"], registry=r)
        self.caption_flips = Counter(
            "spotline_caption_flips", "Captions that moved to another track", ["source"],
            registry=r)
        self.track_boxes = Counter(
            "spotline_track_boxes", "Tracked frames by where their boxes came from: the detect "
            "stage, the detector run in the track stage, or the tracks found by their look "
            "between keyframes", ["by"], registry=r)
        self.track_frames = Counter(
            "spotline_track_frames", "Frames of the track stage: tracked, untracked (no "
            "sequence number, or late), replayed (delivered again)", ["outcome"], registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on ``port`` (0: a free one) at ``addr`` (the ``metrics_host``
        setting; loopback by default). Returns the port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        actual = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", addr, actual)
        return actual


class Poller:
    """A daemon thread that refreshes gauges (backlog, pending, workers) every few seconds."""

    def __init__(self, every_s: float, fn: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._fn = fn
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-poller")

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self._fn()
            except Exception as exc:  # a gauge refresh must never take the worker down
                log.debug("gauge refresh failed: %s", exc)
            if self._stop.wait(self._every):
                return

    def stop(self) -> None:
        self._stop.set()


def gauge_refresher(t: Transport, metrics: Metrics,
                    worker_transport: Transport | None = None) -> Callable[[], None]:
    """A function that sets backlog/pending/workers gauges from XINFO GROUPS and XPENDING, and
    counts the Redis outages the worker's own connection survived."""
    seen_outages = 0

    def refresh() -> None:
        nonlocal seen_outages
        for stage in pipeline(t.settings):  # the track stage too, in track mode
            metrics.backlog.labels(stage).set(t.backlog(stage))
            try:
                metrics.pending.labels(stage).set(t.pending_count(stage))
            except redis.ResponseError:  # stream or group not created yet
                metrics.pending.labels(stage).set(0)
            metrics.workers_alive.labels(stage).set(t.workers_alive(stage))
        metrics.backlog.labels("results").set(t.length(t.keys.results))
        metrics.backlog.labels("dead").set(t.length(t.keys.dead))
        outages = (worker_transport or t).outages
        if outages > seen_outages:
            metrics.redis_outages.inc(outages - seen_outages)
            seen_outages = outages
    return refresh
