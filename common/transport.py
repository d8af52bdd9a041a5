"""Redis Streams transport: consumer groups, batched reads, one atomic commit per batch, the
reclaim (XAUTOCLAIM) of a dead consumer's entries, liveness, and reconnects.

Stages never see this module; the worker loop (common/worker.py) drives it, the collector
(common/collector.py) adds its join scripts through ``script``, and the dead-letter stream
(common/deadletters.py) is written and read through ``write``, ``entries`` and ``move``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import TransportError
from .keys import Keys
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

FRAME_FIELD = b"f"  # frame id in plain text: known even when the payload is not decodable
DATA_FIELD = b"d"  # the msgpack payload

# How often a worker polls to fill a batch during max_wait_ms (see Transport.read).
FILL_POLL_S = 0.001

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)

# The commit of one batch: XADD every output, then XACK + XDEL every input. A script, not
# MULTI/EXEC: Redis runs the rest of a MULTI after a command fails (WRONGTYPE, OOM), which
# would ack inputs whose outputs were never written; a script stops at the first error, before
# any ack, so the inputs stay pending and are retried (a partial write can only duplicate an
# output, and the collector is idempotent by frame id).
# KEYS: inbox, output streams...; ARGV: group, n_outputs, then per output (key index, n_fields,
# field, value, ...), then the input ids to ack.
_COMMIT = """
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local key = KEYS[tonumber(ARGV[i])]
  local n = tonumber(ARGV[i + 1])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[i + 1 + j] end
  redis.call('XADD', key, '*', unpack(fields))
  i = i + 2 + 2 * n
end
local ids = {}
for j = i, #ARGV do ids[#ids + 1] = ARGV[j] end
if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return #ids
"""

@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its stream, id, fields and how often it was delivered."""

    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def frame_id(self) -> str | None:
        raw = self.fields.get(FRAME_FIELD)
        try:
            return raw.decode() if raw else None
        except UnicodeDecodeError:
            return None

    @property
    def payload(self) -> bytes:
        return self.fields.get(DATA_FIELD, b"")


@dataclass(frozen=True)
class Output:
    """A payload to XADD to a stream in the commit."""

    stream: str
    frame_id: str
    payload: bytes


def consumer_name(stage: str) -> str:
    return f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def connect(url: str) -> redis.Redis:
    """A client for a Redis URL; TCP keepalive so a dead server is noticed (a unix socket
    needs none: the peer's death closes it). A URL with ``?cluster=true`` (any node of a Redis
    Cluster) gives a cluster client: every key of a pipeline shares the ``{ns}`` hash tag, so
    its scripts and transactions stay in one slot."""
    keepalive = {} if url.startswith("unix://") else {"socket_keepalive": True}
    base, cluster = _cluster_flag(url)
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(base, socket_connect_timeout=5, **keepalive)  # type: ignore
    # No retries inside redis-py (it would retry silently, for up to a minute):
    # Transport.call owns reconnects, with backoff, a bounded outage and one log line.
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30,
                                retry=Retry(NoBackoff(), 0), **keepalive)


def _cluster_flag(url: str) -> tuple[str, bool]:
    """(the URL without a ``cluster=`` query parameter, whether it asked for a cluster)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    flags = [v for k, v in query if k == "cluster"]
    if not flags:
        return url, False
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    return urlunsplit(parts._replace(query=rest)), flags[-1].lower() in ("1", "true", "yes")


class Transport:
    """All Redis work of a pipeline namespace. Every call retries on connection errors with
    exponential backoff for up to ``settings.reconnect_max_s`` and logs the outage once."""

    def __init__(self, settings: Settings, url: str | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.url = url or settings.redis_url
        if client is None and not self.url:
            raise TransportError("no Redis URL: start an embedded one or set SPOTLINE_REDIS_URL")
        self.r = client or connect(self.url)
        self._commit = self.r.register_script(_COMMIT)
        self.outages = 0  # connection outages survived (tests and metrics read it)

    # --- reliability -----------------------------------------------------------------------
    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn``; on a connection error back off and retry until reconnect_max_s passes."""
        deadline = None
        delay = 0.05
        while True:
            try:
                result = fn()
            except _CONNECTION_ERRORS as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.settings.reconnect_max_s
                    self.outages += 1
                    log.warning("redis unreachable during %s (%s); retrying for up to %.0fs",
                                what, exc, self.settings.reconnect_max_s)
                if now >= deadline:
                    raise TransportError(f"redis unreachable for {self.settings.reconnect_max_s}s "
                                         f"during {what}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if deadline is not None:
                log.warning("redis reachable again (%s)", what)
            return result

    def grouped(self, stage: str, fn: Callable[[], T], what: str) -> T:
        """``call`` for a command on the stage's consumer group; if the group is gone (a Redis
        restarted without persistence forgets it) recreate it, say so, and run ``fn`` again."""
        try:
            return self.call(fn, what)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("stage=%s consumer group missing (Redis restarted without persistence?);"
                        " recreating it", stage)
            self.ensure_group(stage)
            return self.call(fn, what)

    # --- groups and reads ------------------------------------------------------------------
    def ensure_group(self, stage: str) -> None:
        """Create the stage's consumer group (and stream) if missing; idempotent."""
        def create() -> None:
            try:
                self.r.xgroup_create(self.keys.inbox(stage), self.keys.group(stage), id="0",
                                     mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.call(create, f"create group {stage}")

    def read(self, stage: str, consumer: str, count: int, block_ms: int,
             max_wait_ms: int) -> list[Entry]:
        """Read up to ``count`` new entries: block up to ``block_ms`` for the first, then wait at
        most ``max_wait_ms`` more to fill the batch (dynamic batching).

        The fill-up wait polls without BLOCK: Redis checks BLOCK timeouts on its cron tick
        (every 100 ms at the default ``hz`` 10), so a 5 ms BLOCK that finds nothing returns
        after up to 100 ms (measured: docs/performance.md). An XADD still wakes the first,
        long BLOCK at once."""
        got = self._xread(stage, consumer, count, block_ms)
        if got and len(got) < count and max_wait_ms > 0:
            deadline = time.monotonic() + max_wait_ms / 1000
            while len(got) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(FILL_POLL_S, left))
                got += self._xread(stage, consumer, count - len(got), 0)
        return got

    def _xread(self, stage: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        stream, group = self.keys.inbox(stage), self.keys.group(stage)
        reply = self.grouped(stage, lambda: self.r.xreadgroup(
            group, consumer, {stream: ">"}, count=count, block=block_ms or None), "read")
        entries = []
        for _name, items in reply or []:
            for entry_id, fields in items:
                entries.append(Entry(stream, _s(entry_id), fields or {}))
        return entries

    def reclaim(self, stage: str, consumer: str, count: int) -> list[Entry]:
        """Take over entries pending longer than the visibility timeout (a dead consumer's)."""
        stream, group = self.keys.inbox(stage), self.keys.group(stage)
        idle = self.settings.visibility_timeout_ms
        reply = self.grouped(stage, lambda: self.r.xautoclaim(stream, group, consumer, idle,
                                                              "0-0", count=count), "reclaim")
        items = reply[1] if len(reply) > 1 else []
        deleted = list(reply[2] if len(reply) > 2 else [])
        deleted += [eid for eid, fields in items if not fields]  # Redis 6.2 reports them so
        if deleted:  # pending ids whose entries are gone: nothing to redo
            self.call(lambda: self.r.xack(stream, group, *deleted), "ack deleted")
        live = [(eid, fields) for eid, fields in items if fields]
        if not live:
            return []
        counts = self._delivery_counts(stream, group, [_s(eid) for eid, _ in live])
        return [Entry(stream, _s(eid), fields, counts.get(_s(eid), 1)) for eid, fields in live]

    def _delivery_counts(self, stream: str, group: str, ids: list[str]) -> dict[str, int]:
        rows = self.call(lambda: self.r.xpending_range(stream, group, min=ids[0], max=ids[-1],
                                                       count=len(ids) + 1000), "pending")
        return {_s(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def pending_count(self, stage: str) -> int:
        """Entries read but not acknowledged (0 when the group does not exist)."""
        try:
            info = self.call(lambda: self.r.xpending(self.keys.inbox(stage),
                                                     self.keys.group(stage)), "pending")
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return 0
        return int(info["pending"])

    def backlog(self, stage: str) -> int:
        """Entries not yet read by the stage's group (lag), falling back to XLEN - pending."""
        stream, group = self.keys.inbox(stage), self.keys.group(stage)

        def lag() -> int:
            for g in self.r.xinfo_groups(stream):
                if _s(g["name"]) == group:
                    if g.get("lag") is not None:
                        return int(g["lag"])
                    return max(0, int(self.r.xlen(stream)) - int(g["pending"]))
            return int(self.r.xlen(stream))
        try:
            return self.call(lag, "backlog")
        except redis.ResponseError:  # no such stream yet
            return 0

    # --- writes ----------------------------------------------------------------------------
    def add(self, stream: str, frame_id: str, payload: bytes) -> str:
        """XADD one entry (producers)."""
        fields = {FRAME_FIELD: frame_id.encode(), DATA_FIELD: payload}
        return _s(self.call(lambda: self.r.xadd(stream, fields), "publish"))

    def commit(self, stage: str, outputs: Sequence[Output], done: Iterable[str]) -> None:
        """In one atomic step: XADD every output, then XACK and XDEL every input id."""
        records = [(o.stream, {FRAME_FIELD: o.frame_id.encode(), DATA_FIELD: o.payload})
                   for o in outputs]
        self._atomic(stage, records, list(done), "commit")

    def trim(self, stream: str, maxlen: int) -> None:
        """Cap a stream at about ``maxlen`` entries (MAXLEN ~)."""
        self.call(lambda: self.r.xtrim(stream, maxlen=maxlen, approximate=True), "trim")

    def length(self, stream: str) -> int:
        """XLEN (0 for a stream that does not exist)."""
        return int(self.call(lambda: self.r.xlen(stream), "length"))

    def entries(self, stream: str, start: str = "-", end: str = "+",
                count: int | None = None) -> list[tuple[str, dict[bytes, bytes]]]:
        """XRANGE: (id, fields) of a stream's entries from ``start`` to ``end``."""
        rows = self.call(lambda: self.r.xrange(stream, start, end, count=count), "range")
        return [(_s(i), f) for i, f in rows]

    def last_id(self, stream: str) -> str:
        """The id of a stream's newest entry ("0-0" when it is empty)."""
        rows = self.call(lambda: self.r.xrevrange(stream, count=1), "last id")
        return _s(rows[0][0]) if rows else "0-0"

    def tail(self, stream: str, after: str, count: int,
             block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """XREAD (no group): up to ``count`` entries after ``after``, waiting up to
        ``block_ms`` for the first (0: no wait)."""
        reply = self.call(lambda: self.r.xread({stream: after}, count=count,
                                               block=block_ms or None), "tail")
        return [(_s(i), f) for _name, items in reply or [] for i, f in items]

    def get(self, key: str) -> bytes | None:
        """GET a plain key (a frame's stored result)."""
        return self.call(lambda: self.r.get(key), "get")  # type: ignore[return-value]

    def move(self, src: str, entry_id: str, dst: str, fields: dict[bytes, bytes]) -> None:
        """In one transaction: XADD ``fields`` to ``dst`` and XDEL the entry from ``src``."""
        def move() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(dst, fields)  # type: ignore[arg-type]
            pipe.xdel(src, entry_id)
            pipe.execute()
        self.call(move, "move")

    def script(self, source: str) -> Callable[..., Any]:
        """A Lua script registered on this connection: call it as ``f(keys=..., args=...)``
        inside ``call`` (the collector's join and finish)."""
        return self.r.register_script(source)

    def write(self, stage: str, records: Sequence[tuple[str, dict[bytes, bytes]]],
              done: Sequence[str], what: str) -> None:
        """In one atomic step: XADD each (stream, fields) record, then XACK + XDEL ``done``
        from the stage's inbox (the commit; the dead-letter move)."""
        self._atomic(stage, records, list(done), what)

    def _atomic(self, stage: str, records: Sequence[tuple[str, dict[bytes, bytes]]],
                done: list[str], what: str) -> None:
        if not records and not done:
            return
        streams: list[str] = []
        args: list[Any] = [self.keys.group(stage), len(records)]
        for stream, fields in records:
            if stream not in streams:
                streams.append(stream)
            args += [streams.index(stream) + 2, len(fields)]
            for k, v in fields.items():
                args += [k, v]
        args += done
        keys = [self.keys.inbox(stage), *streams]
        self.call(lambda: self._commit(keys=keys, args=args), what)

    # --- liveness --------------------------------------------------------------------------
    def heartbeat(self, stage: str, consumer: str) -> None:
        self.call(lambda: self.r.zadd(self.keys.heartbeat(stage), {consumer: time.time()}),
                  "heartbeat")

    def leave(self, stage: str, consumer: str) -> None:
        try:
            self.r.zrem(self.keys.heartbeat(stage), consumer)
        except _CONNECTION_ERRORS:
            pass

    def workers_alive(self, stage: str, within_s: float = 30.0) -> int:
        return int(self.call(lambda: self.r.zcount(self.keys.heartbeat(stage),
                                                   time.time() - within_s, "+inf"), "workers"))

    claim = reclaim  # the Redis name (XAUTOCLAIM); tests and older callers use it

    def close(self) -> None:
        self.r.close()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
