"""The generic worker loop with trivial pass-through stages, in separate processes."""

from __future__ import annotations

import os
import signal
from collections import Counter

import msgpack
import pytest

from spotline.common.codec import decode, encode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope
from spotline.common.settings import Settings
from spotline.common.transport import Transport
from spotline.common.worker import Worker
from tests.conftest import spawn_worker
from tests.faultlib import wait_for
from tests.stagelib import FailOnBoom, PassThrough

PASS = "tests.stagelib:PassThrough"
SLOW = "tests.stagelib:SlowPassThrough"
CRASH = "tests.stagelib:DiesOnCrash"


def publish(t: Transport, n: int, prefix: str = "f") -> list[str]:
    t.ensure_group("detect")
    ids = []
    for i in range(n):
        env = Envelope(frame_id=f"{prefix}{i}", captions=("a red bus",), image=b"jpeg")
        t.add(t.keys.inbox("detect"), env.frame_id, encode(env))
        ids.append(env.frame_id)
    return ids


def downstream(t: Transport, stage: str = "score") -> Counter[str]:
    return Counter(decode(f[b"d"]).frame_id for _, f in t.r.xrange(t.keys.inbox(stage)))


def test_burst_worker_forwards_every_entry_once(transport: Transport, settings: Settings) -> None:
    ids = publish(transport, 25)
    counts = Worker(PassThrough(settings), settings, transport, burst=True).run()
    assert counts.entries == 25 and counts.outputs == 25 and counts.batches >= 7
    assert downstream(transport) == Counter(ids)
    assert transport.r.xlen(transport.keys.inbox("detect")) == 0
    env = decode(next(iter(transport.r.xrange(transport.keys.inbox("score"))))[1][b"d"])
    assert [row[0] for row in env.trace] == ["detect"]  # the worker records its timing


def test_failing_batch_is_retried_item_by_item(transport: Transport, settings: Settings) -> None:
    publish(transport, 3)
    env = Envelope(frame_id="boom1", captions=("boom",), image=b"x")
    transport.add(transport.keys.inbox("detect"), env.frame_id, encode(env))
    counts = Worker(FailOnBoom(settings.replace(batch_detect=8)), settings.replace(
        batch_detect=8), transport, burst=True).run()
    assert counts.retried_items == 4 and counts.errors == 1
    assert downstream(transport) == Counter(["f0", "f1", "f2"])
    (errored,) = [decode(f[b"d"]) for _, f in transport.r.xrange(transport.keys.inbox("collect"))]
    assert errored.frame_id == "boom1" and "model exploded" in errored.error


def test_two_processes_sigkill_mid_batch_and_poison(redis_server: EmbeddedRedis,
                                                    settings: Settings) -> None:
    s = settings.replace(visibility_timeout_ms=1500, batch_detect=4, max_wait_ms=0)
    t = Transport(s, url=redis_server.url)
    ids = publish(t, 40)
    t.add(t.keys.inbox("detect"), "poison", b"\xc1 not msgpack")
    victim = spawn_worker(s, redis_server.url, "detect", stage_class=SLOW)
    pending = lambda: t.pending_count("detect")  # noqa: E731
    wait_for(lambda: pending() > 0, what="the slow worker to take a batch")
    held = pending()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    workers = [spawn_worker(s, redis_server.url, "detect", stage_class=PASS) for _ in range(2)]
    try:
        wait_for(lambda: sum(downstream(t).values()) >= 40 and t.r.xlen(t.keys.dead) >= 1,
                 what="every entry downstream")
        wait_for(lambda: pending() == 0, what="nothing pending")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=30) for w in workers]
    got = downstream(t)
    assert got == Counter(ids), "every entry exactly once downstream"
    assert held > 0 and codes == [0, 0]  # graceful exit on SIGTERM
    (_, dead), = t.r.xrange(t.keys.dead)
    assert dead[b"frame"] == b"poison" and b"undecodable" in dead[b"reason"]
    # the poison's frame was still answered: an error envelope went to the collector
    (err,) = [decode(f[b"d"]) for _, f in t.r.xrange(t.keys.inbox("collect"))]
    assert err.frame_id == "poison" and "dead-lettered" in err.error


def test_entries_delivered_too_often_are_dead_lettered(transport: Transport,
                                                       settings: Settings) -> None:
    s = settings.replace(visibility_timeout_ms=1, max_deliveries=2)
    t = Transport(s, client=transport.r)
    publish(t, 1)
    def stale() -> bool:  # idle past the 1 ms visibility timeout: the next claim takes it
        rows = t.r.xpending_range(t.keys.inbox("detect"), t.keys.group("detect"), "-", "+", 10)
        return bool(rows) and all(int(r["time_since_delivered"]) >= 2 for r in rows)

    for consumer in ("a", "b"):  # two consumers that took it and died
        t.read("detect", consumer, 1, 10, 0) or t.claim("detect", consumer, 1)
        wait_for(stale, 10, "the entry to go stale")
    counts = Worker(PassThrough(s), s, t, burst=True).run()
    assert counts.dead == 1 and counts.outputs == 0
    (_, dead), = t.r.xrange(t.keys.dead)
    assert b"delivered 3 times" in dead[b"reason"]


def test_sigterm_finishes_the_batch_and_exits_zero(redis_server: EmbeddedRedis,
                                                   settings: Settings) -> None:
    t = Transport(settings, url=redis_server.url)
    t.ensure_group("detect")
    w = spawn_worker(settings, redis_server.url, "detect", stage_class=PASS)
    wait_for(lambda: t.workers_alive("detect") == 1, what="worker heartbeat")
    ids = publish(t, 5)
    wait_for(lambda: sum(downstream(t).values()) == 5, what="forwarding")
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait(timeout=30) == 0
    assert downstream(t) == Counter(ids) and t.workers_alive("detect") == 0


def test_an_entry_that_kills_workers_harms_no_batch_mate(redis_server: EmbeddedRedis,
                                                        settings: Settings) -> None:
    """A crash-inducing entry in a burst of good frames: the worker dies holding the batch;
    its successors retry the held entries one at a time, so only the killer reaches the
    dead-letter stream and every good frame goes on normally, exactly once. An entry that
    makes the decoder itself raise is dead-lettered without a crash."""
    s = settings.replace(visibility_timeout_ms=800, batch_detect=8, max_wait_ms=200,
                         max_deliveries=3)
    t = Transport(s, url=redis_server.url)
    good = publish(t, 6, "a")
    killer = Envelope(frame_id="killer", captions=("crash",), image=b"jpeg")
    t.add(t.keys.inbox("detect"), killer.frame_id, encode(killer))
    # an ndarray ExtType holding a 0-d array where captions go: it once crashed the decoder
    zero_d = msgpack.ExtType(1, b"\x03<u2\x00\x00\x00")
    kind, fields = msgpack.unpackb(encode(Envelope(frame_id="zero-d", image=b"x")))
    raw = msgpack.packb([kind, {**fields, "captions": zero_d}])
    t.add(t.keys.inbox("detect"), "zero-d", raw)
    good += publish(t, 9, "b")
    exits = []
    for _ in range(8):  # a supervisor: restart the worker until it finishes the burst
        proc = spawn_worker(s, redis_server.url, "detect", "--burst", stage_class=CRASH)
        exits.append(proc.wait(timeout=120))
        if exits[-1] == 0:
            break
    assert exits[-1] == 0 and 3 in exits, exits  # it died on the killer, then finished
    assert downstream(t) == Counter(good), "every good frame forwarded once, none lost"
    dead = {f[b"frame"]: f[b"reason"] for _, f in t.r.xrange(t.keys.dead)}
    assert set(dead) == {b"killer", b"zero-d"}, dead
    assert b"delivered 4 times" in dead[b"killer"] and b"undecodable" in dead[b"zero-d"]
    answered = [decode(f[b"d"]) for _, f in t.r.xrange(t.keys.inbox("collect"))]
    assert sorted(e.frame_id for e in answered) == ["killer", "zero-d"]
    assert all("dead-lettered in detect" in (e.error or "") for e in answered)
    assert t.pending_count("detect") == 0


def test_a_decoder_that_raises_dead_letters_the_entry_not_the_worker(
        transport: Transport, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: whatever exception decoding raises (a codec bug), the entry is
    dead-lettered with the reason, its frame answered, and the loop carries on."""
    from spotline.common import worker as worker_module

    ids = publish(transport, 3)
    transport.add(transport.keys.inbox("detect"), "odd", b"\x91\xa1x")  # decodes to ["x"]
    real = worker_module.decode

    def buggy(payload: bytes, **kw: object) -> object:
        if payload == b"\x91\xa1x":
            raise TypeError("iteration over a 0-d array")
        return real(payload, **kw)

    monkeypatch.setattr(worker_module, "decode", buggy)
    counts = Worker(PassThrough(settings), settings, transport, burst=True).run()
    assert counts.dead == 1 and downstream(transport) == Counter(ids)
    (_, dead), = transport.r.xrange(transport.keys.dead)
    assert dead[b"frame"] == b"odd"
    assert dead[b"reason"] == b"undecodable: TypeError: iteration over a 0-d array"
    (err,) = [decode(f[b"d"]) for _, f in transport.r.xrange(transport.keys.inbox("collect"))]
    assert err.frame_id == "odd" and "TypeError" in err.error
