"""Prometheus metrics. Each process (worker, collector, gateway, producer, sink) has its own
registry and serves ``/metrics`` on its own port: no multiprocess mode.

Every registry carries the process's own series (``process_*``: memory, CPU, open files;
``python_info``) and ``spotline_build_info``. ``_created`` series are off: they would double
the series count for nothing a dashboard reads.

Pipeline-wide gauges (backlog, pending, workers alive, tracks alive, feeds) are read from Redis
by ONE process at a time: the holder of a lease in Redis (``PipelineExporter``), so no query
has to take ``max()`` over copies from every worker.

Label values that callers choose (source ids) are capped at ``MAX_SOURCES`` per process; any
further source is counted as ``OTHER``.

Histogram buckets span 0.5 ms (a Redis hop) to 120 s (a real-size SigLIP batch on a CPU).
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from .topology import pipeline
from .transport import Transport

log = logging.getLogger(__name__)
disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SIZE_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2.5e7)
COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)

# Distinct source ids one process labels series with; more are counted as OTHER. Feeds are
# capped by max_feeds (64) and the gateway labels its frames by API key, so this is headroom.
MAX_SOURCES = 256
OTHER = "_other"
# Where frames enter: `spotline publish` (cli), the gateway's /identify (gateway), the feed
# supervisor (feed), the Python client used directly (client), bulk jobs (job).
VIA = ("cli", "gateway", "feed", "client", "job")


def spotline_version() -> str:
    try:
        return version("spotline")
    except PackageNotFoundError:
        return "unknown"


def add_process_series(registry: CollectorRegistry) -> Gauge:
    """The process's own series (``process_*`` where the OS has /proc, ``python_info``) and
    ``spotline_build_info{version,python}`` = 1 on ``registry``. Returns the build gauge."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    build = Gauge("spotline_build_info", "1, labelled with the running spotline and Python "
                  "versions", ["version", "python"], registry=registry)
    build.labels(spotline_version(), platform.python_version()).set(1)
    return build



class Metrics:
    """Every series spotline exports, on one registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = add_process_series(r)
        self._sources: set[str] = set()
        self._sources_lock = threading.Lock()
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
            "spotline_frames_published", "Frames published into the pipeline, by source and "
            "where they entered (cli, gateway, feed, client, job)", ["source", "via"],
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
        self.feeds = Gauge(
            "spotline_feeds", "Registered feeds by their last reported state (pending: not "
            "yet picked up by a supervisor)", ["state"], registry=r)
        self.objective = Gauge(
            "spotline_end_to_end_objective_seconds", "Pipeline-wide: the end-to-end objective "
            "(slo_end_to_end_s) at a quantile, which alert SpotlineEndToEndSlow compares the "
            "capture-to-result quantile with", ["quantile"], registry=r)
        self.exporter = Gauge(
            "spotline_pipeline_exporter", "1 in the one process that exports the pipeline-wide "
            "gauges (it holds the exporter lease in Redis)", registry=r)
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
            "spotline_tracks_alive", "Tracks followed in a source's last tracked frame (from "
            "Redis, by the pipeline-wide exporter)", ["source"], registry=r)
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

    def source(self, source_id: str) -> str:
        """The label value for ``source_id``: itself for the first ``MAX_SOURCES`` distinct
        sources this process has seen, ``OTHER`` after that (caller-chosen ids must not grow
        the series count without bound)."""
        with self._sources_lock:
            if source_id in self._sources:
                return source_id
            if len(self._sources) < MAX_SOURCES:
                self._sources.add(source_id)
                return source_id
        return OTHER

    def count_published(self, source_id: str, via: str) -> None:
        """One frame entered the pipeline (``Client.publish``, the one function every way in
        calls)."""
        self.frames_published.labels(self.source(source_id), via).inc()

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
        """Stop, and wait for a refresh under way to end (none starts after this returns)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


# The exporter lease: take it when free, extend it while held (KEYS[1]; ARGV owner, ttl ms).
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A source's tracks alive, newest frame wins (KEYS[1] hash; ARGV source, seq, alive, now,
# ttl ms): "seq alive time" per source, kept only if seq is newer than the one stored.
_NOTE_ALIVE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local seq = tonumber(string.match(cur, '^(%-?%d+)'))
  if seq and seq >= tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


def exporter_key(t: Transport) -> str:
    return f"{t.keys.tag}:metrics:exporter"


def tracks_alive_key(t: Transport) -> str:
    return f"{t.keys.tag}:metrics:tracks-alive"


class TracksAlive:
    """Tracks alive per source, kept in Redis by the track stage after each frame it saves (the
    newest frame of a source wins, whichever worker tracked it) and read by the exporter: one
    value per source however many track workers share it."""

    def __init__(self, t: Transport) -> None:
        self.t = t
        self.ttl_ms = int(t.settings.track_state_ttl_s * 1000)
        self._note = t.script(_NOTE_ALIVE)

    def note(self, source_id: str, seq: int, alive: int) -> None:
        self.t.run_script(self._note, [tracks_alive_key(self.t)],
                          [source_id, int(seq), int(alive), f"{time.time():.3f}", self.ttl_ms],
                          "tracks alive")

    def read(self) -> dict[str, int]:
        """Each source's tracks alive, sources not tracked within track_state_ttl_s left out."""
        out = {}
        oldest = time.time() - self.t.settings.track_state_ttl_s
        for source, raw in self.t.fields(tracks_alive_key(self.t)).items():
            try:
                _seq, alive, when = raw.decode().split()
            except ValueError:
                continue
            if float(when) >= oldest:
                out[source] = int(alive)
        return out


class PipelineExporter:
    """Sets the pipeline-wide gauges from Redis in the one process that holds the exporter
    lease (SET NX PX, extended at each refresh), and clears them everywhere else: several
    workers may run it, exactly one exports. The lease outlives ``ttl_s`` only while its holder
    refreshes, so a dead exporter is replaced within ``ttl_s``."""

    def __init__(self, t: Transport, metrics: Metrics, ttl_s: float = 15.0) -> None:
        self.t = t
        self.m = metrics
        self.owner = uuid.uuid4().hex
        self.ttl_ms = int(ttl_s * 1000)
        self._lease = t.script(_LEASE)
        self._release = t.script(_RELEASE)
        self.tracks = TracksAlive(t)
        self.leader = False

    def refresh(self) -> bool:
        """Take or extend the lease; export if held, clear if not. Returns whether held."""
        held = bool(self.t.run_script(self._lease, [exporter_key(self.t)],
                                      [self.owner, self.ttl_ms], "exporter lease"))
        if held:
            self._export()
        elif self.leader:
            self._clear()
        self.leader = held
        self.m.exporter.set(1 if held else 0)
        return held

    def _export(self) -> None:
        t, m = self.t, self.m
        for stage in pipeline(t.settings):  # the track stage too, in track mode
            m.backlog.labels(stage).set(t.backlog(stage))
            try:
                m.pending.labels(stage).set(t.pending_count(stage))
            except redis.ResponseError:  # stream or group not created yet
                m.pending.labels(stage).set(0)
            m.workers_alive.labels(stage).set(t.workers_alive(stage))
        m.backlog.labels("results").set(t.length(t.keys.results))
        m.backlog.labels("dead").set(t.length(t.keys.dead))
        _set_all(m.tracks_alive, {(s,): v for s, v in self.tracks.read().items()})
        _set_all(m.feeds, {(state,): n for state, n in self._feeds().items()})
        m.objective.labels("0.95").set(t.settings.slo_end_to_end_s)

    def _feeds(self) -> dict[str, int]:
        """Registered feeds by the state their supervisor last reported (pending if none)."""
        states = {}
        for sid, raw in self.t.fields(self.t.keys.source_status).items():
            try:
                states[sid] = str(json.loads(raw).get("state", "pending"))
            except (ValueError, AttributeError):
                continue
        counts: dict[str, int] = {}
        for sid in self.t.fields(self.t.keys.sources):
            state = states.get(sid, "pending")
            counts[state] = counts.get(state, 0) + 1
        return counts

    def _clear(self) -> None:
        for gauge in (self.m.backlog, self.m.pending, self.m.workers_alive,
                      self.m.tracks_alive, self.m.feeds, self.m.objective):
            gauge.clear()

    def release(self) -> None:
        """Give the lease up (a stopping worker): another process takes over at its next
        refresh instead of after the lease's ttl."""
        if self.leader:
            try:
                self.t.run_script(self._release, [exporter_key(self.t)], [self.owner],
                                  "exporter release")
            except Exception as exc:  # stopping anyway
                log.debug("exporter lease release failed: %s", exc)
            self._clear()
            self.leader = False
            self.m.exporter.set(0)


def _set_all(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    """Set ``gauge`` to exactly ``values``: labels no longer present are removed."""
    for labels in set(gauge_labels(gauge)) - set(values):
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


def gauge_labels(gauge: Gauge) -> list[tuple[str, ...]]:
    """The label value tuples a gauge currently holds."""
    return [tuple(s.labels[n] for n in gauge._labelnames)  # type: ignore[attr-defined]
            for family in gauge.collect() for s in family.samples]


def gauge_refresher(t: Transport, metrics: Metrics,
                    worker_transport: Transport | None = None) -> Callable[[], None]:
    """A function that exports the pipeline-wide gauges if this process holds the exporter lease
    (``PipelineExporter``), and counts the Redis outages this process's own connection
    survived. Its ``exporter`` attribute is the PipelineExporter (release it at stop)."""
    seen_outages = 0
    exporter = PipelineExporter(t, metrics)

    def refresh() -> None:
        nonlocal seen_outages
        outages = (worker_transport or t).outages
        if outages > seen_outages:
            metrics.redis_outages.inc(outages - seen_outages)
            seen_outages = outages
        exporter.refresh()
    refresh.exporter = exporter  # type: ignore[attr-defined]
    return refresh
