"""Transport's stream+group methods against a real redis-server: any group on any stream (the
result sinks' groups on the results stream), the group recreated after a Redis that forgot it,
the XACK-only write for a stream other groups read, and the small reads the producers use."""

import pytest
import redis

from spotline.common.deadletters import DeadLetters, dead_letter_shared
from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.common.transport import DATA_FIELD, FRAME_FIELD, Transport


def _add(t: Transport, stream: str, n: int, first: int = 0) -> list[str]:
    return [t.add(stream, f"f{i}", f"payload {i}".encode()) for i in range(first, first + n)]


def _pending_ids(t: Transport, stream: str, group: str) -> list[str]:
    rows = t.r.xpending_range(stream, group, min="-", max="+", count=100)
    return [r["message_id"].decode() for r in rows]


def test_create_group_is_idempotent_and_starts_where_asked(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    _add(t, stream, 2)
    assert t.create_group(stream, "all", "0") is True
    assert t.create_group(stream, "all", "0") is False  # BUSYGROUP: already there
    assert t.create_group(stream, "new", "$") is True
    assert [e.frame_id for e in t.read_group(stream, "all", "c", 10)] == ["f0", "f1"]
    assert t.read_group(stream, "new", "c", 10) == []  # "$": only what comes after
    _add(t, stream, 1, first=2)
    assert [e.frame_id for e in t.read_group(stream, "new", "c", 10)] == ["f2"]
    assert t.create_group(t.keys.inbox("x"), "g") is True and t.length(t.keys.inbox("x")) == 0


def test_read_group_new_then_own_pending_and_ack_keeps_the_entry(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    t.create_group(stream, "g")
    ids = _add(t, stream, 3)
    got = t.read_group(stream, "g", "c1", 2)
    assert [e.id for e in got] == ids[:2] and got[0].payload == b"payload 0"
    assert all(e.stream == stream and e.deliveries == 1 for e in got)
    # another consumer sees the rest, never what c1 holds
    assert [e.id for e in t.read_group(stream, "g", "c2", 10)] == ids[2:]
    # pending: c1's own unacked entries again, not new ones, without waiting
    assert [e.id for e in t.read_group(stream, "g", "c1", 10, 5000, pending=True)] == ids[:2]
    assert t.ack(stream, "g", [ids[0]]) == 1
    assert t.ack(stream, "g", [ids[0]]) == 0 and t.ack(stream, "g", []) == 0
    assert [e.id for e in t.read_group(stream, "g", "c1", 10, pending=True)] == ids[1:2]
    assert t.length(stream) == 3  # XACK only: the stream is shared with other readers


def test_an_entry_trimmed_while_pending_comes_back_without_fields(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    t.create_group(stream, "g")
    ids = _add(t, stream, 2)
    t.read_group(stream, "g", "c", 10)
    t.r.xdel(stream, ids[0])
    rows = t.read_group(stream, "g", "c", 10, pending=True)
    assert [(e.id, e.fields) for e in rows] == [(ids[0], {}), (ids[1], rows[1].fields)]
    assert rows[1].frame_id == "f1"


def test_a_group_redis_forgot_is_recreated_at_its_start(transport: Transport,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    t, stream = transport, transport.keys.results
    t.create_group(stream, "g", "$")
    _add(t, stream, 1)
    t.r.xgroup_destroy(stream, "g")  # what a restart without persistence does to a group
    assert t.read_group(stream, "g", "c", 10, start="$") == []  # recreated at "$": nothing
    assert "group=g consumer group missing" in caplog.text
    assert t.group_info(stream, "g") is not None
    t.r.xgroup_destroy(stream, "g")
    assert [e.frame_id for e in t.read_group(stream, "g", "c", 10, start="0")] == ["f0"]
    t.r.xgroup_destroy(stream, "g")
    assert t.reclaim_group(stream, "g", "c", 10, idle_ms=0) == []  # recreated, nothing pending
    assert t.group_info(stream, "g") is not None


def test_reclaim_group_takes_over_a_dead_consumers_entries(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    t.create_group(stream, "g")
    ids = _add(t, stream, 3)
    assert len(t.read_group(stream, "g", "dead", 10)) == 3
    assert t.reclaim_group(stream, "g", "live", 10) == []  # within the visibility timeout
    t.r.xdel(stream, ids[1])  # gone while pending: nothing to redo, so acked
    claimed = t.reclaim_group(stream, "g", "live", 10, idle_ms=0)
    assert [(e.frame_id, e.deliveries) for e in claimed] == [("f0", 2), ("f2", 2)]
    assert _pending_ids(t, stream, "g") == [ids[0], ids[2]]
    assert [e.id for e in t.read_group(stream, "g", "live", 10, pending=True)] == [ids[0],
                                                                                     ids[2]]


def test_group_info_lag_and_pending(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    assert t.group_info(stream, "g") is None  # no stream
    _add(t, stream, 3)
    assert t.group_info(stream, "g") is None  # no group
    t.create_group(stream, "g")
    t.read_group(stream, "g", "c", 1)
    g = t.group_info(stream, "g")
    assert g is not None and int(g["pending"]) == 1
    assert g.get("lag") in (None, 2)  # Redis 7 counts the unread; 6.2 has no lag field


def test_work_is_backlog_plus_pending_in_one_read(transport: Transport) -> None:
    """The follow policy's figure for a stage: entries unread plus entries in flight."""
    t = transport
    assert t.work("score") == 0  # no stream, no group
    _add(t, t.keys.inbox("score"), 3)
    assert t.work("score") == 3 == t.backlog("score") + t.pending_count("score")  # no group
    t.ensure_group("score")
    assert t.read("score", "c", 1, 10, 0)
    assert t.work("score") == 3 == t.backlog("score") + t.pending_count("score")


def test_write_and_ack_without_delete_keeps_the_input(transport: Transport) -> None:
    t, src, dst = transport, transport.keys.results, transport.keys.inbox("out")
    t.create_group(src, "g")
    ids = _add(t, src, 2)
    t.read_group(src, "g", "c", 10)
    t.write_and_ack(src, "g", [(dst, {FRAME_FIELD: b"f0", DATA_FIELD: b"x"})], [ids[0]],
                    delete=False)
    assert t.length(dst) == 1 and t.length(src) == 2 and _pending_ids(t, src, "g") == [ids[1]]
    t.write_and_ack(src, "g", [], [ids[1]], delete=True)
    assert t.length(src) == 1 and _pending_ids(t, src, "g") == []


def test_write_and_ack_that_fails_acks_nothing(transport: Transport) -> None:
    t, src, dst = transport, transport.keys.results, transport.keys.inbox("out")
    t.create_group(src, "g")
    ids = _add(t, src, 1)
    t.read_group(src, "g", "c", 10)
    t.r.set(dst, "not a stream")  # the XADD fails (WRONGTYPE) before any ack
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        t.write_and_ack(src, "g", [(dst, {b"k": b"v"})], ids, delete=False)
    assert _pending_ids(t, src, "g") == ids


def test_dead_letter_shared_acks_without_deleting_and_is_listed(transport: Transport) -> None:
    t, results = transport, transport.keys.results
    t.create_group(results, "sink-x")
    t.create_group(results, "sink-y")
    _add(t, results, 1)
    entry, = t.read_group(results, "sink-x", "c", 10)
    dead_letter_shared(t, "sink-x", entry, "webhook failed after 3 attempt(s): HTTP 500", 3)
    row, = DeadLetters(t).list()
    assert (row.stream, row.stage, row.entry_id, row.frame) == (results, "sink-x", entry.id, "f0")
    assert (row.deliveries, row.payload) == (3, b"payload 0") and "HTTP 500" in row.reason
    assert _pending_ids(t, results, "sink-x") == []
    assert t.length(results) == 1  # still there for the other group
    assert [e.id for e in t.read_group(results, "sink-y", "c", 10)] == [entry.id]


def test_recent_fields_liveness_and_ping(transport: Transport) -> None:
    t, stream = transport, transport.keys.results
    assert t.recent(stream, 5) == [] and t.last_id(stream) == "0-0"
    ids = _add(t, stream, 3)
    assert [i for i, _f in t.recent(stream, 2)] == [ids[2], ids[1]]  # newest first
    assert t.last_id(stream) == ids[2]
    assert t.fields(t.keys.counters) == {}
    t.r.hset(t.keys.counters, mapping={"dropped:cam": 2, "rejected:cam": 1})
    assert t.fields(t.keys.counters) == {"dropped:cam": b"2", "rejected:cam": b"1"}
    t.ping()
    assert t.workers_alive("detect", retry=False) == 0
    t.heartbeat("detect", "w1")
    assert t.workers_alive("detect", 15.0, retry=False) == 1 == t.workers_alive("detect")


def test_probes_do_not_wait_for_a_redis_that_is_gone(settings: Settings) -> None:
    server = EmbeddedRedis().start()
    t = Transport(settings.replace(reconnect_max_s=30), url=server.url)
    t.ping()
    server.close()
    with pytest.raises(redis.ConnectionError):
        t.ping()
    with pytest.raises(redis.ConnectionError):
        t.workers_alive("detect", retry=False)
    assert t.outages == 0  # no reconnect loop was entered
