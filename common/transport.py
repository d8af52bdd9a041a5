"""Redis Streams transport: consumer groups, batched reads, one atomic commit per batch, the
reclaim (XAUTOCLAIM) of a dead consumer's entries, liveness, and reconnects.

Stages never see this module; the worker loop (common/worker.py) drives it, the collector
(common/collector.py) adds its join scripts through ``script``, and the dead-letter stream
(common/deadletters.py) is written and read through ``write``, ``entries`` and ``move``.
The stream+group methods (``create_group``, ``read_group``, ``reclaim_group``, ``ack``,
``group_info``, ``write_and_ack``) serve any group on any stream: the result sinks
(producer/sinks.py) read the results stream through them.
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

# The commit of one batch: XADD every output, then XACK (+ XDEL) every input. A script, not
# MULTI/EXEC: Redis runs the rest of a MULTI after a command fails (WRONGTYPE, OOM), which
# would ack inputs whose outputs were never written; a script stops at the first error, before
# any ack, so the inputs stay pending and are retried (a partial write can only duplicate an
# output, and the collector is idempotent by frame id).
# KEYS: input stream, output streams...; ARGV: group, delete ("1": XDEL the inputs too; "0":
# XACK only, for a stream other groups read), n_outputs, then per output (key index, n_fields,
# field, value, ...), then the input ids to ack.
_COMMIT = """
local i = 4
for _ = 1, tonumber(ARGV[3]) do
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
  if ARGV[2] == '1' then redis.call('XDEL', KEYS[1], unpack(ids)) end
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

    def on_group(self, stream: str, group: str, start: str, fn: Callable[[], T],
                 what: str) -> T:
        """``call`` for a command on a consumer group; if the group is gone (a Redis restarted
        without persistence forgets it) recreate it at ``start``, say so, and run ``fn``
        again."""
        try:
            return self.call(fn, what)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("stream=%s group=%s consumer group missing (Redis restarted without "
                        "persistence?); recreating it", stream, group)
            self.create_group(stream, group, start)
            return self.call(fn, what)

    # --- any stream and group --------------------------------------------------------------
    # The stages' inboxes and the sinks' groups on the results stream alike; the stage-level
    # methods further down apply these to a stage's inbox and group.
    def create_group(self, stream: str, group: str, start: str = "0") -> bool:
        """Create ``group`` on ``stream`` (and the stream) if missing, reading from ``start``
        ("0": all the stream holds; "$": only what comes after now); idempotent. True when
        this call created it."""
        def create() -> bool:
            try:
                self.r.xgroup_create(stream, group, id=start, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                return False
            return True
        return self.call(create, f"create group {group}")

    def read_group(self, stream: str, group: str, consumer: str, count: int,
                   block_ms: int = 0, *, pending: bool = False, start: str = "0") -> list[Entry]:
        """XREADGROUP: up to ``count`` new entries, waiting up to ``block_ms`` for the first (0:
        no wait). ``pending``: instead, this consumer's own entries read earlier and not acked
        (no wait; one trimmed from the stream since comes back with no fields). A group gone
        missing is recreated at ``start``."""
        since, block = ("0", None) if pending else (">", block_ms or None)
        reply = self.on_group(stream, group, start, lambda: self.r.xreadgroup(
            group, consumer, {stream: since}, count=count, block=block), "read")
        return [Entry(stream, _s(i), f or {}) for _name, items in reply or [] for i, f in items]

    def reclaim_group(self, stream: str, group: str, consumer: str, count: int,
                      idle_ms: int | None = None, *, start: str = "0") -> list[Entry]:
        """XAUTOCLAIM: take over up to ``count`` entries of the group pending longer than
        ``idle_ms`` (the visibility timeout by default): a dead consumer's. Pending ids whose
        entries are gone (trimmed or deleted) are acked, as there is nothing to redo; each
        entry returned carries its delivery count."""
        idle = self.settings.visibility_timeout_ms if idle_ms is None else idle_ms
        reply = self.on_group(stream, group, start, lambda: self.r.xautoclaim(
            stream, group, consumer, idle, "0-0", count=count), "reclaim")
        items = reply[1] if len(reply) > 1 else []
        live = [(_s(eid), fields) for eid, fields in items if eid is not None and fields]
        deleted = [_s(eid) for eid in (reply[2] if len(reply) > 2 else [])]
        if any(eid is None or not fields for eid, fields in items):  # Redis 6.2: a nil each
            deleted += self._gone(stream, group, consumer, {eid for eid, _ in live})
        self.ack(stream, group, deleted)
        if not live:
            return []
        counts = self._delivery_counts(stream, group, [eid for eid, _ in live])
        return [Entry(stream, eid, fields, counts.get(eid, 1)) for eid, fields in live]

    def _gone(self, stream: str, group: str, consumer: str, live: set[str]) -> list[str]:
        """The consumer's pending ids whose entries are no longer in the stream. Redis 6.2's
        XAUTOCLAIM claims such an entry but answers nil for it, id included (7.0 lists the ids
        apart and drops them from the pending list itself)."""
        rows = self.call(lambda: self.r.xpending_range(stream, group, min="-", max="+",
                                                       count=1000, consumername=consumer),
                         "pending")
        ids = [_s(row["message_id"]) for row in rows if _s(row["message_id"]) not in live]
        return [i for i in ids if not self.call(lambda i=i: self.r.xrange(stream, i, i),
                                                "range")]

    def _delivery_counts(self, stream: str, group: str, ids: list[str]) -> dict[str, int]:
        rows = self.call(lambda: self.r.xpending_range(stream, group, min=ids[0], max=ids[-1],
                                                       count=len(ids) + 1000), "pending")
        return {_s(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        """XACK ``ids`` in the group, without XDEL (the stream may be read by other groups);
        how many were pending."""
        if not ids:
            return 0
        return int(self.call(lambda: self.r.xack(stream, group, *ids), "ack"))

    def group_info(self, stream: str, group: str) -> dict[str, Any] | None:
        """The group's row of XINFO GROUPS (``pending``; ``lag``: entries not yet read, None
        where Redis cannot count it: before 7.0, or across a trim), or None when the stream
        or the group does not exist."""
        try:
            rows = self.call(lambda: self.r.xinfo_groups(stream), "group info")
        except redis.ResponseError:  # no such stream
            return None
        return next((g for g in rows if _s(g["name"]) == group), None)

    # --- a stage's inbox -------------------------------------------------------------------
    def ensure_group(self, stage: str) -> None:
        """Create the stage's consumer group (and stream) if missing; idempotent."""
        self.create_group(self.keys.inbox(stage), self.keys.group(stage))

    def read(self, stage: str, consumer: str, count: int, block_ms: int,
             max_wait_ms: int) -> list[Entry]:
        """Read up to ``count`` new entries: block up to ``block_ms`` for the first, then wait at
        most ``max_wait_ms`` more to fill the batch (dynamic batching).

        The fill-up wait polls without BLOCK: Redis checks BLOCK timeouts on its cron tick
        (every 100 ms at the default ``hz`` 10), so a 5 ms BLOCK that finds nothing returns
        after up to 100 ms (measured: docs/performance.md). An XADD still wakes the first,
        long BLOCK at once."""
        stream, group = self.keys.inbox(stage), self.keys.group(stage)
        got = self.read_group(stream, group, consumer, count, block_ms)
        if got and len(got) < count and max_wait_ms > 0:
            deadline = time.monotonic() + max_wait_ms / 1000
            while len(got) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(FILL_POLL_S, left))
                got += self.read_group(stream, group, consumer, count - len(got))
        return got

    def reclaim(self, stage: str, consumer: str, count: int) -> list[Entry]:
        """Take over entries pending longer than the visibility timeout (a dead consumer's)."""
        return self.reclaim_group(self.keys.inbox(stage), self.keys.group(stage), consumer,
                                  count)

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
        return self._unread_and_pending(stage)[0]

    def work(self, stage: str) -> int:
        """Entries waiting for or held by the stage's group: ``backlog`` + ``pending_count``
        from one XINFO GROUPS row."""
        return sum(self._unread_and_pending(stage))

    def _unread_and_pending(self, stage: str) -> tuple[int, int]:
        """(unread, in flight) for the stage's group from its XINFO GROUPS row, plus XLEN
        where Redis cannot count the lag; the whole stream is unread without a group."""
        stream = self.keys.inbox(stage)
        g = self.group_info(stream, self.keys.group(stage))
        if g is None:
            return self.length(stream), 0
        pending = int(g["pending"])
        if g.get("lag") is not None:
            return int(g["lag"]), pending
        return max(0, self.length(stream) - pending), pending

    # --- writes ----------------------------------------------------------------------------
    def add(self, stream: str, frame_id: str, payload: bytes) -> str:
        """XADD one entry (producers)."""
        fields = {FRAME_FIELD: frame_id.encode(), DATA_FIELD: payload}
        return _s(self.call(lambda: self.r.xadd(stream, fields), "publish"))

    def commit(self, stage: str, outputs: Sequence[Output], done: Iterable[str]) -> None:
        """In one atomic step: XADD every output, then XACK and XDEL every input id."""
        records = [(o.stream, {FRAME_FIELD: o.frame_id.encode(), DATA_FIELD: o.payload})
                   for o in outputs]
        self.write(stage, records, done, "commit")

    def trim(self, stream: str, maxlen: int, *, exact: bool = False) -> None:
        """Cap a stream at about ``maxlen`` entries (MAXLEN ~), or at exactly ``maxlen`` with
        ``exact`` (MAXLEN =, slower)."""
        self.call(lambda: self.r.xtrim(stream, maxlen=maxlen, approximate=not exact), "trim")

    def length(self, stream: str) -> int:
        """XLEN (0 for a stream that does not exist)."""
        return int(self.call(lambda: self.r.xlen(stream), "length"))

    def entries(self, stream: str, start: str = "-", end: str = "+",
                count: int | None = None) -> list[tuple[str, dict[bytes, bytes]]]:
        """XRANGE: (id, fields) of a stream's entries from ``start`` to ``end``."""
        rows = self.call(lambda: self.r.xrange(stream, start, end, count=count), "range")
        return [(_s(i), f) for i, f in rows]

    def recent(self, stream: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """XREVRANGE: (id, fields) of a stream's ``count`` newest entries, newest first."""
        rows = self.call(lambda: self.r.xrevrange(stream, count=count), "recent")
        return [(_s(i), f) for i, f in rows]

    def last_id(self, stream: str) -> str:
        """The id of a stream's newest entry ("0-0" when it is empty)."""
        rows = self.recent(stream, 1)
        return rows[0][0] if rows else "0-0"

    def tail(self, stream: str, after: str, count: int,
             block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """XREAD (no group): up to ``count`` entries after ``after``, waiting up to
        ``block_ms`` for the first (0: no wait)."""
        reply = self.call(lambda: self.r.xread({stream: after}, count=count,
                                               block=block_ms or None), "tail")
        return [(_s(i), f) for _name, items in reply or [] for i, f in items]

    def get(self, key: str) -> bytes | None:
        """GET a plain key (a frame's stored result, a preview)."""
        return self.call(lambda: self.r.get(key), "get")  # type: ignore[return-value]

    def fields(self, key: str) -> dict[str, bytes]:
        """HGETALL a hash, field names as text ({} when the key does not exist)."""
        raw = self.call(lambda: self.r.hgetall(key), "hash")
        return {_s(k): v for k, v in raw.items()}  # type: ignore[union-attr]

    # --- plain keys and hashes (the producer's sequence numbers, previews, feed registry) ----
    def increment(self, key: str) -> int:
        """INCR a counter key; its new value."""
        return int(self.call(lambda: self.r.incr(key), "increment"))  # type: ignore[arg-type]

    def set_value(self, key: str, value: bytes | str, *, ttl_s: int | None = None,
                  ttl_ms: int | None = None, only_new: bool = False) -> bool:
        """SET a plain key, expiring after ``ttl_s`` seconds or ``ttl_ms`` milliseconds;
        ``only_new`` (NX): only when the key does not exist. True when it was set."""
        return bool(self.call(lambda: self.r.set(key, value, ex=ttl_s, px=ttl_ms,
                                                 nx=only_new), "set"))

    def delete_keys(self, *keys: str) -> int:
        """DEL keys of any type (a stream too); how many existed."""
        if not keys:
            return 0
        return int(self.call(lambda: self.r.delete(*keys), "delete"))  # type: ignore[arg-type]

    def set_field(self, key: str, name: str, value: bytes | str, *,
                  only_new: bool = False) -> bool:
        """HSET one field of a hash; ``only_new`` (HSETNX): only when the field does not
        exist, and True only then."""
        if only_new:
            return bool(self.call(lambda: self.r.hsetnx(key, name, value), "set field"))
        self.call(lambda: self.r.hset(key, name, value), "set field")
        return True

    def set_field_within(self, key: str, name: str, value: bytes | str, limit: int) -> int:
        """HSETNX only while the hash holds fewer than ``limit`` fields, checked atomically
        (WATCH: a concurrent write makes it look again): 1 set, 0 the field exists, -1 the
        hash is full."""
        def add() -> int:
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        if pipe.hexists(key, name):
                            return 0
                        if pipe.hlen(key) >= limit:
                            return -1
                        pipe.multi()
                        pipe.hsetnx(key, name, value)
                        return int(pipe.execute()[0])
                    except redis.WatchError:
                        continue
        return int(self.call(add, "set field within"))

    def increment_field(self, key: str, name: str, by: int = 1) -> int:
        """HINCRBY one field of a hash; its new value."""
        return int(self.call(lambda: self.r.hincrby(key, name, by), "increment field"))

    def delete_fields(self, fields: Sequence[tuple[str, str]]) -> list[int]:
        """In one transaction: HDEL each (hash, field); how many each removed (0 or 1)."""
        def delete() -> list[int]:
            pipe = self.r.pipeline(transaction=True)
            for key, name in fields:
                pipe.hdel(key, name)
            return [int(n) for n in pipe.execute()]
        return self.call(delete, "delete fields") if fields else []

    def memory(self) -> dict[str, int]:
        """Redis' ``used_memory`` and ``used_memory_peak`` (INFO memory), in bytes."""
        info = self.call(lambda: self.r.info("memory"), "memory")
        return {"used_memory": int(info["used_memory"]),  # type: ignore[index]
                "used_memory_peak": int(info["used_memory_peak"])}  # type: ignore[index]

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
              done: Iterable[str], what: str) -> None:
        """In one atomic step: XADD each (stream, fields) record, then XACK + XDEL ``done``
        from the stage's inbox (the commit; the dead-letter move)."""
        self.write_and_ack(self.keys.inbox(stage), self.keys.group(stage), records, done,
                           what=what)

    def write_and_ack(self, stream: str, group: str,
                      records: Sequence[tuple[str, dict[bytes, bytes]]], done: Iterable[str],
                      *, delete: bool = True, what: str = "write") -> None:
        """In one atomic step (a script: nothing is acked unless every record was written):
        XADD each (stream, fields) record, then XACK ``done`` in ``group`` of ``stream`` and,
        with ``delete``, XDEL them (not for a stream other groups read too)."""
        done = list(done)
        if not records and not done:
            return
        streams: list[str] = []
        args: list[Any] = [group, "1" if delete else "0", len(records)]
        for out, fields in records:
            if out not in streams:
                streams.append(out)
            args += [streams.index(out) + 2, len(fields)]
            for k, v in fields.items():
                args += [k, v]
        args += done
        keys = [stream, *streams]
        self.call(lambda: self._commit(keys=keys, args=args), what)

    # --- hashes and scripts of the track store (common/trackstore.py) -----------------------
    # Each a ``call``: a Redis outage (a restart, a dropped connection) is ridden out with the
    # reconnects and bounded wait of every other stage's Redis work, not turned into errors.
    def hash_get(self, key: str, names: Sequence[str]) -> list[bytes | None]:
        """HMGET: the values of ``names`` in a hash (None where missing)."""
        return list(self.call(lambda: self.r.hmget(key, list(names)), "hash get"))

    def hash_size(self, key: str) -> int:
        """HLEN (0 for a hash that does not exist)."""
        return int(self.call(lambda: self.r.hlen(key), "hash size"))

    def run_script(self, script: Callable[..., Any], keys: Sequence[str],
                   args: Sequence[Any], what: str) -> Any:
        """Run a script from ``script`` inside ``call``: after a reconnect it runs again, so it
        must be idempotent (a lost reply is indistinguishable from a lost request). A Redis
        restarted since forgot the script: redis-py loads it again."""
        return self.call(lambda: script(keys=list(keys), args=list(args)), what)

    # --- liveness --------------------------------------------------------------------------
    def heartbeat(self, stage: str, consumer: str) -> None:
        self.call(lambda: self.r.zadd(self.keys.heartbeat(stage), {consumer: time.time()}),
                  "heartbeat")

    def leave(self, stage: str, consumer: str) -> None:
        try:
            self.r.zrem(self.keys.heartbeat(stage), consumer)
        except _CONNECTION_ERRORS:
            pass

    def workers_alive(self, stage: str, within_s: float = 30.0, *, retry: bool = True) -> int:
        """Consumers of the stage that beat within ``within_s``. ``retry=False``: one try, no
        reconnect loop (a probe answers now; a connection error is raised as it is)."""
        def count() -> int:
            return int(self.r.zcount(self.keys.heartbeat(stage), time.time() - within_s,
                                     "+inf"))
        return self.call(count, "workers") if retry else count()

    def ping(self) -> None:
        """PING once, no reconnect loop (a probe answers now): raises what redis-py raises."""
        self.r.ping()

    claim = reclaim  # the Redis name (XAUTOCLAIM); tests and older callers use it

    def close(self) -> None:
        self.r.close()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
