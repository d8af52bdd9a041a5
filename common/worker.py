"""The worker loop: runs any Stage against its inbox stream, and knows no stage by name.

read (or reclaim) → decode → runner.run_batch → encode → ONE commit (XADD outputs + XACK/XDEL
inputs). Entries of a dead consumer are reclaimed one at a time, so an entry that kills workers
harms no batch-mate; poison (undecodable, the wrong message, delivered too often) goes to the
dead-letter stream (common/deadletters.py) and its frame still gets an (error) result. The
collector (common/collector.py) is this loop with a join in place of forwarding.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from types import FrameType

from . import cores
from .codec import decode, encode
from .deadletters import answer_for, dead_letter
from .envelope import Envelope, Result, strip
from .errors import DecodeError, TransportError
from .extras import stage_missing_extra
from .logs import StageLog, about
from .metrics import Metrics
from .runner import Observer, Pair, run_batch, traced
from .settings import Settings
from .stage import Stage
from .topology import RESULT, error_target, pipeline
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
class Item:
    """A decoded entry."""

    entry: Entry
    env: Envelope


def enqueue_time(entry_id: str) -> float:
    """Stream ids are ``<ms>-<seq>`` from the server clock: the entry's enqueue time."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


class _Observed(Observer):
    """The runner's reports as metrics and counts."""

    def __init__(self, metrics: Metrics, counts: Counts) -> None:
        self.m, self.counts = metrics, counts

    def batch(self, stage: str, size: int) -> None:
        self.m.batch_size.labels(stage).observe(size)

    def outcome(self, stage: str, outcome: str, n: int = 1) -> None:
        if outcome != "ok":  # an item run alone after its batch failed
            self.counts.retried_items += n
        if outcome == "error":
            self.counts.errors += n
        self.m.entries.labels(stage, outcome).inc(n)

    def model_seconds(self, stage: str, per_item: float) -> None:
        self.m.stage_seconds.labels(stage, "model").observe(per_item)


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
        stage.metrics = self.metrics
        self.consumer = consumer or consumer_name(stage.name)
        self.counts = Counts()
        self.observer = _Observed(self.metrics, self.counts)
        self.log = StageLog(log, stage.name, self.consumer)
        self.stopping = False
        self._last_claim = 0.0
        self._last_beat = 0.0
        self.threads = 0  # the count the stage last ran a batch on (threads_policy follow)
        self.threads_used = 0  # ...and the count its model runs on (an export may keep its own)

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Finish the batch in hand, commit it, then exit."""
        if not self.stopping:
            self.log.info("stopping (signal %s)", signum)
        self.stopping = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> Counts:
        name = self.stage.name
        self.t.ensure_group(name)
        try:
            self.stage.setup()
        except ImportError as exc:  # a library of a role this install left out
            raise stage_missing_extra(exc, name, self.settings) or exc from None
        self.metrics.model_loaded.labels(name, self.stage.model_name or name,
                                         self.stage.device_name).set(1)
        for choice in self.stage.precision_choices:
            self.metrics.model_precision.labels(choice.model, choice.precision,
                                                choice.reason).set(1)
        self.log.info("ready (burst=%s)", self.burst)
        try:
            while not self.stopping:
                self._beat()
                if not self._step() and self.burst and self._idle():
                    break
        finally:
            self.t.leave(name, self.consumer)
        self.log.info("done: %s", self.counts)
        return self.counts

    def _step(self) -> bool:
        """Handle what there is: a dead consumer's entries one at a time (one of them may be
        what killed it: alone, it cannot take its batch-mates down with it again), else one
        batch of new entries. False when there was nothing."""
        reclaimed = self._reclaim()
        for entry in reclaimed:
            self.handle([entry])
        if reclaimed:
            return True
        entries = self._read()
        if entries:
            self.handle(entries)
        return bool(entries)

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.t.heartbeat(self.stage.name, self.consumer)

    def _idle(self) -> bool:
        """Burst mode stops when nothing is unread or pending in the inbox."""
        return self.t.pending_count(self.stage.name) == 0 and self.t.backlog(self.stage.name) == 0

    def _reclaim(self) -> list[Entry]:
        """A dead consumer's entries, looked for a few times per visibility timeout."""
        now = time.monotonic()
        if now - self._last_claim < self.settings.visibility_timeout_ms / 4000:
            return []
        self._last_claim = now
        claimed = self.t.reclaim(self.stage.name, self.consumer,
                                 self.settings.batch_for(self.stage.name))
        if claimed:
            self.counts.reclaimed += len(claimed)
            self.metrics.reclaimed.labels(self.stage.name).inc(len(claimed))
            self.log.warning("reclaimed %d stale entries (handled one at a time): %s",
                             len(claimed), [e.id for e in claimed])
        return claimed

    def _read(self) -> list[Entry]:
        s = self.settings
        block = min(s.block_ms, max(1, s.visibility_timeout_ms // 4)) if self.burst else s.block_ms
        return self.t.read(self.stage.name, self.consumer, s.batch_for(self.stage.name), block,
                           s.max_wait_ms)

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
        if items:
            self.process(items, started)

    def _decode(self, entry: Entry) -> Item | None:
        """Decode one entry; poison (undecodable, delivered too often) is dead-lettered. Any
        exception the decoder raises is the entry's fault, never the loop's."""
        if entry.deliveries > self.settings.max_deliveries:
            self._dead(entry, f"delivered {entry.deliveries} times (max "
                              f"{self.settings.max_deliveries}): it kills or stalls workers")
            return None
        try:
            msg = decode(entry.payload, max_bytes=MAX_ENTRY_BYTES)
        except DecodeError as exc:
            self._dead(entry, f"undecodable: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not crash the worker
            self._dead(entry, f"undecodable: {type(exc).__name__}: {exc}")
            return None
        if not isinstance(msg, Envelope):
            self._dead(entry, f"a {type(msg).__name__} is not an input of stage {self.stage.name}")
            return None
        return Item(entry, msg)

    def _dead(self, entry: Entry, reason: str) -> None:
        """Dead-letter an entry; if its frame is known, answer the frame with an error."""
        frame = entry.frame_id
        self.log.error("%s dead-lettered: %s", about(frame, entry.id), reason)
        outputs: list[Output] = []
        if frame:
            try:
                env = answer_for(entry, frame, f"dead-lettered in {self.stage.name}: {reason}")
                outputs = self.answer_dead(env, reason)
            except Exception as exc:  # noqa: BLE001 - answer bare rather than not at all
                self.log.error("%s answering with a bare error (%s: %s)", about(frame, entry.id),
                               type(exc).__name__, exc)
                bare = Envelope(frame_id=frame, source_id="unknown",
                                error=f"dead-lettered in {self.stage.name}: {reason}")
                outputs = self.answer_dead(bare, reason)
        dead_letter(self.t, self.stage.name, entry, reason, outputs)
        self.counts.dead += 1
        self.metrics.dead_letters.labels(self.stage.name).inc()
        self.metrics.entries.labels(self.stage.name, "dead").inc()

    def answer_dead(self, env: Envelope, reason: str) -> list[Output]:
        """What answers a dead-lettered frame: its error envelope, sent to the collector."""
        return [self.output(error_target(self.stage.name), strip(env))]

    # --- forwarding ------------------------------------------------------------------------
    def process(self, items: list[Item], started: float) -> None:
        """Run the stage on the batch and commit its outputs with the inputs' acks."""
        name = self.stage.name
        by_frame = {it.env.frame_id: it.entry for it in items}
        self.take_cores()
        pairs = run_batch(self.stage, [it.env for it in items], self.settings, self.observer,
                          self.log, {fid: e.id for fid, e in by_frame.items()})
        finished = time.time()
        t0 = time.time()
        self._observe_boxes(pairs)
        enqueued = {fid: enqueue_time(e.id) for fid, e in by_frame.items()}
        outputs = [self.output(target, msg)
                   for target, msg in traced(pairs, name, enqueued, started, finished)]
        self.metrics.stage_seconds.labels(name, "encode").observe(time.time() - t0)
        t0 = time.time()
        self.t.commit(name, outputs, [it.entry.id for it in items])
        self.metrics.stage_seconds.labels(name, "redis").observe(time.time() - t0)
        self.counts.outputs += len(outputs)

    def take_cores(self) -> int:
        """``threads_policy`` follow: before each batch, the threads this model stage may use
        given the other model stages' work (unread plus in-flight entries; common/cores.py),
        applied through the stage. Returns the count (0: the policy does not apply: static,
        a fixed ``torch_threads``, or a stage without a model)."""
        s, name = self.settings, self.stage.name
        if s.threads_policy != "follow" or s.torch_threads > 0 or name not in cores.SHARES:
            return 0
        others = [st for st in cores.model_stages(pipeline(s)) if st != name]
        try:
            work = {st: self.t.work(st) for st in others}
        except TransportError as exc:  # keep the last count; the commit will meet the outage
            self.log.warning("threads unchanged (%s): cannot read the backlogs: %s",
                             self.threads, exc)
            return self.threads
        n = cores.follow_threads(cores.cpu_count(), name, work)
        if n != self.threads:
            used = self.stage.use_threads(n)
            self.threads, self.threads_used = n, n if used is None else used
        self.metrics.threads.labels(name).set(self.threads_used)
        return n

    def _observe_boxes(self, pairs: list[Pair]) -> None:
        """Boxes per frame, counted where frames get their boxes: a stage whose inputs have
        none and which forwards envelopes (detect; the collector forwards results)."""
        for env_in, routed in pairs:
            sent = [m for _, m in routed if isinstance(m, Envelope)]
            if env_in.boxes is None and any(m.boxes is not None for m in sent):
                self.metrics.crops_per_frame.observe(sum(
                    len(m.boxes) for m in sent if m.boxes is not None))

    def output(self, target: str, msg: Envelope | Result) -> Output:
        """An output for the commit: the message encoded, for ``target``'s inbox."""
        if target == RESULT:
            raise ValueError(f"stage {self.stage.name} cannot publish results")
        payload = encode(msg)
        self.metrics.entry_bytes.labels(target).observe(len(payload))
        return Output(self.t.keys.inbox(target), msg.frame_id, payload)
