"""The generic worker loop: runs any Stage against its inbox stream.

read a batch → decode → stage.process (item by item if the batch fails) → encode → ONE commit
(XADD outputs + XACK/XDEL inputs). Stale entries of dead consumers are reclaimed; poison goes to
the dead-letter stream and its frame still gets an (error) result.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import redis

from .codec import decode, encode
from .envelope import Envelope, Result, error_result, merge_parts
from .errors import DecodeError, TransportError
from .metrics import Metrics, Poller
from .settings import STAGES, Settings
from .stage import RESULT, Routed, Stage
from .transport import Entry, Output, Transport, consumer_name

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# An entry bigger than this is refused as poison (frames are capped well below it).
MAX_ENTRY_BYTES = 256 * 1024 * 1024


@dataclass
class Counts:
    """What a worker did (burst-mode tests assert these)."""

    batches: int = 0
    entries: int = 0
    outputs: int = 0
    errors: int = 0
    retried_items: int = 0
    dead: int = 0
    reclaimed: int = 0
    duplicates: int = 0
    results: int = 0
    by_frame: dict[str, int] = field(default_factory=dict, repr=False)  # not in the log line


@dataclass
class _Item:
    entry: Entry
    env: Envelope


def enqueue_time(entry_id: str) -> float:
    """Stream ids are ``<ms>-<seq>`` from the server clock: the entry's enqueue time."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


class Worker:
    """Runs one stage in this process until stopped (or, in burst mode, until idle)."""

    def __init__(self, stage: Stage, settings: Settings, transport: Transport,
                 burst: bool = False, metrics: Metrics | None = None,
                 consumer: str | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self.t = transport
        self.burst = burst
        self.metrics = metrics or Metrics()
        self.consumer = consumer or consumer_name(stage.name)
        self.counts = Counts()
        self.stopping = False
        self._last_claim = 0.0
        self._last_beat = 0.0

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Finish the batch in hand, commit it, then exit."""
        if not self.stopping:
            log.info("stage=%s consumer=%s stopping (signal %s)", self.stage.name, self.consumer,
                     signum)
        self.stopping = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> Counts:
        name = self.stage.name
        self.t.ensure_group(name)
        self.stage.setup()
        self.metrics.model_loaded.labels(name, self.stage.model_name or name,
                                         self.stage.device_name).set(1)
        log.info("stage=%s consumer=%s ready (burst=%s)", name, self.consumer, self.burst)
        try:
            while not self.stopping:
                self._beat()
                entries = self._next_entries()
                if entries:
                    self.handle(entries)
                elif self.burst and self._idle():
                    break
        finally:
            self.t.leave(name, self.consumer)
        log.info("stage=%s consumer=%s done: %s", name, self.consumer, self.counts)
        return self.counts

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.t.heartbeat(self.stage.name, self.consumer)

    def _idle(self) -> bool:
        """Burst mode stops when nothing is unread or pending in the inbox."""
        return self.t.pending_count(self.stage.name) == 0 and self.t.backlog(self.stage.name) == 0

    def _next_entries(self) -> list[Entry]:
        s = self.settings
        count = s.batch_for(self.stage.name)
        now = time.monotonic()
        # Look for a dead consumer's entries a few times per visibility timeout.
        if now - self._last_claim >= s.visibility_timeout_ms / 4000:
            self._last_claim = now
            claimed = self.t.claim(self.stage.name, self.consumer, count)
            if claimed:
                self.counts.reclaimed += len(claimed)
                self.metrics.reclaimed.labels(self.stage.name).inc(len(claimed))
                log.warning("stage=%s reclaimed %d stale entries: %s", self.stage.name,
                            len(claimed), [e.id for e in claimed])
                return claimed
        block = min(s.block_ms, max(1, s.visibility_timeout_ms // 4)) if self.burst else s.block_ms
        return self.t.read(self.stage.name, self.consumer, count, block, s.max_wait_ms)

    # --- one batch -------------------------------------------------------------------------
    def handle(self, entries: list[Entry]) -> None:
        """Decode, process and commit one batch of entries."""
        name = self.stage.name
        self.counts.batches += 1
        self.counts.entries += len(entries)
        started = time.time()
        items = []
        for entry in entries:
            self.metrics.stage_seconds.labels(name, "queue_wait").observe(
                max(0.0, started - enqueue_time(entry.id)))
            item = self._decode(entry)
            if item is not None:
                items.append(item)
        self.metrics.stage_seconds.labels(name, "decode").observe(time.time() - started)
        if not items:
            return
        if name == "collect":
            self._collect(items, started)
        else:
            self._forward(items, started)

    def _decode(self, entry: Entry) -> _Item | None:
        """Decode one entry; poison (undecodable, delivered too often) is dead-lettered."""
        if entry.deliveries > self.settings.max_deliveries:
            self._dead(entry, f"delivered {entry.deliveries} times (max "
                              f"{self.settings.max_deliveries}): it kills or stalls workers")
            return None
        try:
            msg = decode(entry.payload, max_bytes=MAX_ENTRY_BYTES)
        except DecodeError as exc:
            self._dead(entry, f"undecodable: {exc}")
            return None
        if not isinstance(msg, Envelope):
            self._dead(entry, f"a {type(msg).__name__} is not an input of stage {self.stage.name}")
            return None
        return _Item(entry, msg)

    def _dead(self, entry: Entry, reason: str) -> None:
        """Dead-letter an entry; if its frame is known, answer the frame with an error."""
        frame = entry.frame_id
        log.error("stage=%s frame=%s entry=%s dead-lettered: %s", self.stage.name, frame,
                  entry.id, reason)
        outputs: list[Output] = []
        if frame:
            env = _dead_answer(entry, frame, f"dead-lettered in {self.stage.name}: {reason}")
            if self.stage.name == "collect":
                result = error_result(env, env.error or reason, self.settings.fallback_box)
                self.t.finish(frame, encode(result), ())
                self._count_result(result)
            else:
                outputs.append(self._output("collect", _strip(env)))
        self.t.dead_letter(self.stage.name, entry, reason, outputs)
        self.counts.dead += 1
        self.metrics.dead_letters.labels(self.stage.name).inc()
        self.metrics.entries.labels(self.stage.name, "dead").inc()

    # --- model work with item-by-item fallback ----------------------------------------------
    def _process(self, envs: list[Envelope]) -> list[tuple[Envelope, list[Routed]]]:
        """Run the stage on the batch; if it raises, on each item alone; an item that fails
        alone is answered with an error. Returns (input, its outputs) pairs."""
        name = self.stage.name
        errored = [e for e in envs if e.error is not None]
        todo = [e for e in envs if e.error is None]
        pairs = [(e, [self._error_route(e, e.error or "")]) for e in errored]
        if not todo:
            return pairs
        self.metrics.batch_size.labels(name).observe(len(todo))
        t0 = time.time()
        try:
            routed = self.stage.process(todo)
            pairs += _group_by_frame(todo, routed)
            self.metrics.entries.labels(name, "ok").inc(len(todo))
        except Exception as exc:
            log.warning("stage=%s batch of %d failed (%s: %s); retrying item by item", name,
                        len(todo), type(exc).__name__, exc)
            for env in todo:
                pairs.append((env, self._process_one(env)))
        self.metrics.stage_seconds.labels(name, "model").observe(
            (time.time() - t0) / max(1, len(todo)))
        return pairs

    def _process_one(self, env: Envelope) -> list[Routed]:
        name = self.stage.name
        self.counts.retried_items += 1
        try:
            routed = self.stage.process([env])
            self.metrics.entries.labels(name, "retried").inc()
            return routed
        except Exception as exc:
            reason = f"{name} failed: {type(exc).__name__}: {exc}"
            log.error("stage=%s frame=%s %s", name, env.frame_id, reason)
            self.counts.errors += 1
            self.metrics.entries.labels(name, "error").inc()
            return [self._error_route(env, reason)]

    def _error_route(self, env: Envelope, reason: str) -> Routed:
        if self.stage.name == "collect":
            return (RESULT, error_result(env, reason, self.settings.fallback_box))
        return ("collect", _strip(env.replace(error=reason)))

    # --- forwarding stages (detect, upscale, score) ------------------------------------------
    def _forward(self, items: list[_Item], started: float) -> None:
        name = self.stage.name
        by_frame = {it.env.frame_id: it.entry for it in items}
        pairs = self._process([it.env for it in items])
        finished = time.time()
        t0 = time.time()
        outputs = []
        for env_in, routed in pairs:
            enq = enqueue_time(by_frame[env_in.frame_id].id)
            if name == "detect":
                self.metrics.crops_per_frame.observe(sum(
                    len(m.boxes) for _, m in routed
                    if isinstance(m, Envelope) and m.boxes is not None))
            for target, msg in routed:
                if isinstance(msg, Envelope):
                    msg = msg.traced(name, enq, started, finished)
                outputs.append(self._output(target, msg))
        self.metrics.stage_seconds.labels(name, "encode").observe(time.time() - t0)
        t0 = time.time()
        self.t.commit(name, outputs, [it.entry.id for it in items])
        self.metrics.stage_seconds.labels(name, "redis").observe(time.time() - t0)
        self.counts.outputs += len(outputs)

    def _output(self, target: str, msg: Envelope | Result) -> Output:
        if target == RESULT:
            raise ValueError(f"stage {self.stage.name} cannot publish results")
        payload = encode(msg)
        self.metrics.entry_bytes.labels(target).observe(len(payload))
        return Output(self.t.keys.inbox(target), msg.frame_id, payload)

    # --- the collector ----------------------------------------------------------------------
    def _collect(self, items: list[_Item], started: float) -> None:
        """Join parts in Redis; frames that are complete (or errored) get their one result."""
        complete: dict[str, tuple[Envelope, list[str]]] = {}
        for it in items:
            env = it.env
            if env.frame_id in complete:  # a second part or copy completing the same frame
                complete[env.frame_id][1].append(it.entry.id)
                continue
            if env.error is not None:
                complete[env.frame_id] = (env, [it.entry.id])
                continue
            parts = self.t.join(it.entry, env.frame_id, env.part, env.nparts)
            if parts is None:
                continue  # waiting for the frame's other parts (this one is acked)
            if parts == []:
                self.counts.duplicates += 1
                self.metrics.entries.labels("collect", "duplicate").inc()
                log.info("frame=%s entry=%s already answered; dropped", env.frame_id, it.entry.id)
                continue
            complete[env.frame_id] = (_merge_or_error(env, parts), [it.entry.id])
        if not complete:
            return
        pairs = self._process([env for env, _ in complete.values()])
        done = {fid: ids for fid, (_env, ids) in complete.items()}
        finished = time.time()
        for env_in, routed in pairs:
            for _target, msg in routed:
                assert isinstance(msg, Result)
                enq = enqueue_time(done[env_in.frame_id][0])
                msg = msg.replace(trace=(*msg.trace, ("collect", enq, started, finished)),
                                  finished_time=time.time())
                if self.t.finish(msg.frame_id, encode(msg), done[env_in.frame_id]):
                    self._count_result(msg)
                else:
                    self.counts.duplicates += 1

    def _count_result(self, result: Result) -> None:
        self.counts.results += 1
        self.counts.by_frame[result.frame_id] = self.counts.by_frame.get(result.frame_id, 0) + 1
        outcome = "error" if result.error else ("fallback" if result.fallback else "ok")
        self.metrics.results.labels(outcome).inc()
        if result.capture_time > 0:
            self.metrics.e2e_seconds.labels(result.source_id).observe(result.latency)


def _dead_answer(entry: Entry, frame: str, error: str) -> Envelope:
    """The error envelope that answers a dead-lettered entry's frame: with the entry's own
    fields (source, captions, capture time) when its payload is an envelope, else bare (an
    undecodable payload, or a Result where an Envelope belongs)."""
    try:
        msg = decode(entry.payload)
    except DecodeError:
        msg = None
    if isinstance(msg, Envelope):
        return msg.replace(frame_id=frame, error=error)
    return Envelope(frame_id=frame, source_id="unknown", error=error)


def _strip(env: Envelope) -> Envelope:
    """An error envelope carries no pixels: the collector only needs the frame's identity."""
    return env.replace(image=None, crops=(), boxes=None, det_scores=None, scores=None, part=0,
                       nparts=1)


def _group_by_frame(inputs: Sequence[Envelope], routed: list[Routed]) -> list[
        tuple[Envelope, list[Routed]]]:
    by_id: dict[str, list[Routed]] = {e.frame_id: [] for e in inputs}
    for target, msg in routed:
        by_id.setdefault(msg.frame_id, []).append((target, msg))
    first = {e.frame_id: e for e in inputs}
    return [(first[fid], outs) for fid, outs in by_id.items() if fid in first]


def _merge_or_error(env: Envelope, parts: list[bytes]) -> Envelope:
    """The joined frame; parts that do not fit together (shapes that some other writer got
    wrong) make an error envelope for the frame instead of killing the collector."""
    try:
        return merge_parts([decode(p) for p in parts])  # type: ignore[misc]
    except Exception as exc:  # noqa: BLE001 - any failure here is this frame's, not the worker's
        reason = f"collect cannot join the parts: {type(exc).__name__}: {exc}"
        log.error("frame=%s %s", env.frame_id, reason)
        return _strip(env.replace(error=reason))


def run_stage(stage: Stage, settings: Settings, url: str, burst: bool = False,
              metrics_port: int | None = None) -> Counts:
    """Entry point of `spotline worker STAGE`: connect, serve metrics, run until stopped."""
    metrics = Metrics()
    transport = Transport(settings, url=url)
    poller = None
    if metrics_port is not None:
        metrics.serve(metrics_port)
        # Gauges read Redis on their own connection, never the worker's.
        poller = Poller(5.0, gauge_refresher(Transport(settings, url=url), metrics,
                                             transport)).start()
    worker = Worker(stage, settings, transport, burst=burst, metrics=metrics)
    worker.install_signals()
    try:
        return worker.run()
    except TransportError:
        log.exception("stage=%s giving up: redis unreachable", stage.name)
        raise
    finally:
        if poller:
            poller.stop()


def gauge_refresher(t: Transport, metrics: Metrics,
                    worker_transport: Transport | None = None) -> Callable[[], None]:
    """A function that sets backlog/pending/workers gauges from XINFO GROUPS and XPENDING, and
    counts the Redis outages the worker's own connection survived."""
    seen_outages = 0

    def refresh() -> None:
        nonlocal seen_outages
        for stage in STAGES:
            metrics.backlog.labels(stage).set(t.backlog(stage))
            try:
                metrics.pending.labels(stage).set(t.pending_count(stage))
            except redis.ResponseError:  # stream or group not created yet
                metrics.pending.labels(stage).set(0)
            metrics.workers_alive.labels(stage).set(t.workers_alive(stage))
        metrics.backlog.labels("results").set(t.r.xlen(t.keys.results))
        metrics.backlog.labels("dead").set(t.r.xlen(t.keys.dead))
        outages = (worker_transport or t).outages
        if outages > seen_outages:
            metrics.redis_outages.inc(outages - seen_outages)
            seen_outages = outages
    return refresh
