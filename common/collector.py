"""The collector: joins the parts of each frame in Redis and publishes its one result.

A frame fans out into parts (at most ``crops_per_part`` crops each); every part reaches the
collector's inbox on its own. ``Join.add`` stores a part in the frame's hash and acks it, except
the part that completes the frame: that one stays pending until ``Join.finish`` has written the
result key, the results stream and the pub/sub message and acked it, so a crash in between loses
nothing and a redelivery finds the result and is dropped (publish once, by frame id).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .codec import decode, encode
from .envelope import Envelope, Result, error_result, strip
from .logs import about
from .runner import merge_or_error, run_batch
from .topology import COLLECT
from .transport import DATA_FIELD, FRAME_FIELD, Entry, Output, Transport
from .worker import Item, Worker, enqueue_time

# Store one part; ack it unless it completes the frame (then the caller finishes the frame and
# acks in FINISH, so a crash in between leaves the last part pending: no loss).
# KEYS: join hash, result key, inbox; ARGV: group, entry id, part, nparts, payload, ttl.
# Returns {-1} when the frame already has a result (duplicate delivery), {0} when parts are
# still missing, or {1, field, value, ...} with every part when the frame is complete.
_JOIN = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
  return {-1}
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if redis.call('HLEN', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
  return {0}
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 1)
return out
"""

# Publish one result exactly once (idempotent by frame id) and ack the entries that made it.
# KEYS: result key, results stream, join hash, inbox; ARGV: payload, ttl, results maxlen,
# channel, group, frame id, frame field, data field, then the entry ids to ack.
_FINISH = """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', ARGV[7], ARGV[6], ARGV[8], ARGV[1])
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  created = 1
end
redis.call('DEL', KEYS[3])
for i = 9, #ARGV do
  redis.call('XACK', KEYS[4], ARGV[5], ARGV[i])
  redis.call('XDEL', KEYS[4], ARGV[i])
end
return created
"""


class Join:
    """The join of one namespace's frames, in Redis."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self._join = transport.script(_JOIN)
        self._finish = transport.script(_FINISH)

    def add(self, entry: Entry, frame_id: str, part: int, nparts: int) -> list[bytes] | None:
        """Store one part of a frame. Returns every part's payload (ordered) when the frame is
        complete, ``None`` when parts are missing, ``[]`` when the frame already has a result."""
        k, t = self.t.keys, self.t
        reply = t.call(lambda: self._join(
            keys=[k.join(frame_id), k.result(frame_id), k.inbox(COLLECT)],
            args=[k.group(COLLECT), entry.id, part, nparts, entry.payload,
                  t.settings.result_ttl_s]), "join")
        if reply[0] == -1:
            return []
        if reply[0] == 0:
            return None
        pairs = reply[1:]
        parts = {int(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}
        return [parts[i] for i in sorted(parts)]

    def finish(self, frame_id: str, payload: bytes, done: Sequence[str]) -> bool:
        """Publish a frame's result once (stream, pub/sub, result key) and ack ``done``.
        Returns False when the frame already had a result (nothing published)."""
        k, s = self.t.keys, self.t.settings
        created = self.t.call(lambda: self._finish(
            keys=[k.result(frame_id), k.results, k.join(frame_id), k.inbox(COLLECT)],
            args=[payload, s.result_ttl_s, s.results_maxlen, k.channel, k.group(COLLECT),
                  frame_id, FRAME_FIELD, DATA_FIELD, *done]), "finish")
        return bool(created)


class Collector(Worker):
    """The worker loop of the last stage: join, run the stage, publish each result once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join = Join(self.t)

    def process(self, items: list[Item], started: float) -> None:
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
            parts = self.join.add(it.entry, env.frame_id, env.part, env.nparts)
            if parts is None:
                continue  # waiting for the frame's other parts (this one is acked)
            if parts == []:
                self.counts.duplicates += 1
                self.metrics.entries.labels(self.stage.name, "duplicate").inc()
                self.log.info("%s already answered; dropped", about(env.frame_id, it.entry.id))
                continue
            complete[env.frame_id] = (self._joined(env, parts), [it.entry.id])
        if complete:
            self._publish(complete, started)

    def _joined(self, env: Envelope, parts: list[bytes]) -> Envelope:
        """The frame's parts merged; parts that do not decode or fit together (some other
        writer got them wrong) answer the frame with an error instead of killing the loop."""
        try:
            decoded = [decode(p) for p in parts]
        except Exception as exc:  # noqa: BLE001 - this frame's failure, not the worker's
            reason = f"collect cannot decode a part: {type(exc).__name__}: {exc}"
            self.log.error("%s %s", about(env.frame_id), reason)
            return strip(env.replace(error=reason))
        return merge_or_error(env, decoded, self.log)  # type: ignore[arg-type]

    def _publish(self, complete: dict[str, tuple[Envelope, list[str]]], started: float) -> None:
        done = {fid: ids for fid, (_env, ids) in complete.items()}
        pairs = run_batch(self.stage, [env for env, _ in complete.values()], self.settings,
                          self.observer, self.log, {fid: ids[0] for fid, ids in done.items()})
        finished = time.time()
        for env_in, routed in pairs:
            ids = done[env_in.frame_id]
            for _target, msg in routed:
                assert isinstance(msg, Result)
                msg = msg.traced(self.stage.name, enqueue_time(ids[0]), started, finished)
                if self.join.finish(msg.frame_id, encode(msg), ids):
                    self.count_result(msg)
                else:
                    self.counts.duplicates += 1

    def answer_dead(self, env: Envelope, reason: str) -> list[Output]:
        """A dead-lettered frame's error result, published at once (nothing goes onward)."""
        result = error_result(env, env.error or reason, self.settings.fallback_box)
        self.join.finish(env.frame_id, encode(result), ())
        self.count_result(result)
        return []

    def count_result(self, result: Result) -> None:
        """Counts and the result metrics (outcome; capture-to-result latency by source)."""
        self.counts.results += 1
        self.counts.by_frame[result.frame_id] = self.counts.by_frame.get(result.frame_id, 0) + 1
        outcome = "error" if result.error else ("fallback" if result.fallback else "ok")
        self.metrics.results.labels(outcome).inc()
        if result.capture_time > 0:
            self.metrics.e2e_seconds.labels(self.metrics.source(result.source_id)).observe(
                result.latency)
