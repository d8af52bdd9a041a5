"""Transport against a real redis-server: groups, batched reads, atomic commits, claims,
dead letters, the collector's join, and reconnects."""

import threading
import time

import pytest

from spotline.common.codec import decode, encode
from spotline.common.collector import Join
from spotline.common.deadletters import dead_letter
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope
from spotline.common.errors import TransportError
from spotline.common.settings import Settings
from spotline.common.transport import Output, Transport
from tests.faultlib import wait_for


def _fill(t: Transport, stage: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        env = Envelope(frame_id=f"f{i}", captions=("c",))
        ids.append(t.add(t.keys.inbox(stage), env.frame_id, encode(env)))
    return ids


def test_group_creation_is_idempotent(transport: Transport) -> None:
    transport.ensure_group("detect")
    transport.ensure_group("detect")
    assert transport.r.xinfo_groups(transport.keys.inbox("detect"))[0]["name"] == b"detect-workers"


def test_all_keys_share_the_hash_tag(transport: Transport) -> None:
    k = transport.keys
    names = [k.inbox("detect"), k.results, k.dead, k.result("x"), k.join("x"), k.heartbeat("s")]
    assert all(n.startswith("{" + k.namespace + "}:") for n in names)


def test_batched_read_takes_max_entries_or_max_wait(transport: Transport) -> None:
    transport.ensure_group("detect")
    _fill(transport, "detect", 5)
    assert len(transport.read("detect", "c1", 3, 100, 0)) == 3
    t0 = time.monotonic()
    got = transport.read("detect", "c1", 10, 100, 50)  # only 2 left: waits <= 50 ms more
    assert len(got) == 2 and time.monotonic() - t0 < 1.0
    assert transport.read("detect", "c1", 10, 10, 0) == []


def test_max_wait_is_kept_to_the_millisecond(transport: Transport) -> None:
    """Redis checks a BLOCK timeout only on its 100 ms cron tick; the fill-up wait must not
    inherit that (it made every stage wait ~100 ms on a batch that was not full)."""
    transport.ensure_group("detect")
    _fill(transport, "detect", 1)
    t0 = time.monotonic()
    assert len(transport.read("detect", "c1", 4, 100, 10)) == 1
    assert 0.009 <= time.monotonic() - t0 < 0.06


def test_commit_writes_outputs_and_acks_inputs_atomically(transport: Transport) -> None:
    k = transport.keys
    transport.ensure_group("detect")
    _fill(transport, "detect", 3)
    got = transport.read("detect", "c1", 3, 100, 0)
    outs = [Output(k.inbox("score"), e.frame_id or "", e.payload) for e in got]
    transport.commit("detect", outs, [e.id for e in got])
    assert transport.r.xlen(k.inbox("score")) == 3
    assert transport.r.xlen(k.inbox("detect")) == 0  # XDEL'd
    assert transport.pending_count("detect") == 0


def test_a_failed_commit_acks_nothing(transport: Transport) -> None:
    k = transport.keys
    transport.ensure_group("detect")
    _fill(transport, "detect", 1)
    got = transport.read("detect", "c1", 1, 100, 0)
    transport.r.set(k.inbox("score"), "not a stream")  # the XADD will fail (WRONGTYPE)
    with pytest.raises(Exception, match="WRONGTYPE"):
        transport.commit("detect", [Output(k.inbox("score"), "f0", b"x")], [got[0].id])
    # the input is neither acked nor deleted: it stays pending for a retry
    assert transport.pending_count("detect") == 1 and transport.r.xlen(k.inbox("detect")) == 1


def test_claim_takes_over_stale_entries_with_delivery_counts(
        redis_server: EmbeddedRedis, settings: Settings) -> None:
    t = Transport(settings.replace(visibility_timeout_ms=50), url=redis_server.url)
    t.ensure_group("detect")
    _fill(t, "detect", 2)
    assert len(t.read("detect", "dead-consumer", 2, 100, 0)) == 2
    assert t.claim("detect", "live", 10) == []  # not stale yet
    claimed: list = []
    wait_for(lambda: bool(claimed.extend(t.claim("detect", "live", 10)) or claimed), 10,
             "the entries to go stale")  # a claim before that takes nothing
    assert [e.frame_id for e in claimed] == ["f0", "f1"]
    assert all(e.deliveries == 2 for e in claimed)


def test_dead_letter_keeps_the_entry_and_reason(transport: Transport) -> None:
    k = transport.keys
    transport.ensure_group("detect")
    transport.add(k.inbox("detect"), "bad", b"\x00garbage")
    entry = transport.read("detect", "c", 1, 100, 0)[0]
    dead_letter(transport, "detect", entry, "undecodable: test")
    (dead_id, fields), = transport.r.xrange(k.dead)
    assert fields[b"payload"] == b"\x00garbage" and fields[b"reason"] == b"undecodable: test"
    assert fields[b"frame"] == b"bad" and fields[b"stream"] == k.inbox("detect").encode()
    assert transport.pending_count("detect") == 0


def test_join_then_finish_publishes_exactly_once(transport: Transport) -> None:
    k = transport.keys
    transport.ensure_group("collect")
    parts = [Envelope(frame_id="F", part=i, nparts=2) for i in range(2)]
    for p in parts:
        transport.add(k.inbox("collect"), "F", encode(p))
    e0, e1 = transport.read("collect", "c", 2, 100, 0)
    join = Join(transport)
    assert join.add(e0, "F", 0, 2) is None  # waiting for part 1; part 0 acked
    got = join.add(e1, "F", 1, 2)
    assert got is not None and [decode(g).part for g in got] == [0, 1]
    assert join.finish("F", b"result", [e1.id]) is True
    assert join.finish("F", b"again", [e1.id]) is False  # idempotent by frame id
    assert transport.r.xlen(k.results) == 1 and transport.r.get(k.result("F")) == b"result"
    assert transport.r.ttl(k.result("F")) > 0 and not transport.r.exists(k.join("F"))
    # a late duplicate of a part is acked and dropped
    transport.add(k.inbox("collect"), "F", encode(parts[0]))
    dup = transport.read("collect", "c", 1, 100, 0)[0]
    assert join.add(dup, "F", 0, 2) == []
    assert transport.pending_count("collect") == 0


def test_reconnects_after_a_server_restart(settings: Settings) -> None:
    with EmbeddedRedis() as server:
        t = Transport(settings.replace(reconnect_max_s=20), url=server.url)
        t.ensure_group("detect")
        server.stop()  # in-memory server: the stream is gone, the client must reconnect
        threading.Timer(0.5, server.start).start()
        t.ensure_group("detect")  # retried with backoff until the server is back
        assert t.outages == 1
        _fill(t, "detect", 1)
        assert len(t.read("detect", "c", 1, 100, 0)) == 1


def test_gives_up_with_a_clear_error(settings: Settings) -> None:
    server = EmbeddedRedis().start()
    t = Transport(settings.replace(reconnect_max_s=0.3), url=server.url)
    server.close()
    with pytest.raises(TransportError, match="unreachable"):
        t.ensure_group("detect")


def test_plain_keys_and_hashes(transport: Transport) -> None:
    """The writes of the producer side: counters, expiring keys, leases, registry fields."""
    k = transport.keys
    assert [transport.increment(k.seq("cam")) for _ in range(3)] == [1, 2, 3]
    assert transport.set_value(k.preview("F"), b"jpeg", ttl_s=60)
    assert transport.get(k.preview("F")) == b"jpeg" and 0 < transport.r.ttl(k.preview("F")) <= 60
    lease = k.source_lease("cam")
    assert transport.set_value(lease, "me", ttl_ms=5000, only_new=True)
    assert not transport.set_value(lease, "you", ttl_ms=5000, only_new=True)
    assert transport.get(lease) == b"me" and 0 < transport.r.pttl(lease) <= 5000
    assert transport.set_field(k.sources, "a", "1")
    assert not transport.set_field(k.sources, "a", "2", only_new=True)
    assert transport.set_field(k.sources, "b", "3", only_new=True)
    assert transport.fields(k.sources) == {"a": b"1", "b": b"3"}
    assert transport.set_field_within(k.sources, "a", "x", 5) == 0  # exists
    assert transport.set_field_within(k.sources, "c", "4", 3) == 1
    assert transport.set_field_within(k.sources, "d", "5", 3) == -1  # full
    assert transport.increment_field(k.counters, "dropped:cam") == 1
    assert transport.increment_field(k.counters, "dropped:cam", 2) == 3
    transport.set_field(k.source_status, "a", "running")
    assert transport.delete_fields([(k.sources, "a"), (k.source_status, "a"),
                                    (k.sources, "nope")]) == [1, 1, 0]
    assert transport.delete_fields([]) == []
    assert transport.delete_keys(k.preview("F"), k.seq("cam"), k.join("none")) == 2
    assert transport.delete_keys() == 0 and transport.get(k.preview("F")) is None
    memory = transport.memory()
    assert 0 < memory["used_memory"] <= memory["used_memory_peak"]


def test_exact_trim_empties_a_stream_and_keeps_its_group(transport: Transport) -> None:
    _fill(transport, "detect", 3)
    transport.ensure_group("detect")
    transport.trim(transport.keys.inbox("detect"), 0, exact=True)
    assert transport.length(transport.keys.inbox("detect")) == 0
    assert transport.group_info(transport.keys.inbox("detect"), transport.keys.group("detect"))


def test_plain_key_writes_ride_out_a_restart(settings: Settings) -> None:
    with EmbeddedRedis() as server:
        t = Transport(settings.replace(reconnect_max_s=20), url=server.url)
        assert t.increment(t.keys.seq("cam")) == 1
        server.stop()  # in-memory server: the counter is gone with it
        threading.Timer(0.5, server.start).start()
        assert t.increment(t.keys.seq("cam")) == 1  # retried until the server is back
        assert t.outages == 1
        assert t.set_field(t.keys.sources, "cam", "{}", only_new=True)
