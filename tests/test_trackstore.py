"""Tracking state and embedding cache in a real Redis: compare-and-set by sequence number,
TTL and cap, and a tracker continued by another "worker" from what Redis holds."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from spotline.common.embedded import EmbeddedRedis
from spotline.common.keys import Keys
from spotline.common.trackstore import CachedEmbedding, EmbeddingCache, TrackStore
from spotline.common.transport import Transport
from spotline.stages.tracking.evidence import Evidence
from spotline.stages.tracking.tracker import SourceTracker
from tests.faultlib import wait_for
from tests.test_tracker import scene


@pytest.fixture
def client(transport):
    return transport.r


def test_state_is_saved_only_forward(transport, client, settings):
    store = TrackStore(transport, ttl_s=60)
    assert store.load("cam1") == (-1, None)
    assert store.save("cam1", 3, {"v": 1, "x": np.arange(3)})
    assert not store.save("cam1", 3, {"v": 1, "x": np.arange(5)})  # same frame again
    assert not store.save("cam1", 2, {"v": 1})  # a stale worker
    seq, state = store.load("cam1")
    assert seq == 3 and state["x"].tolist() == [0, 1, 2]
    assert store.save("cam1", 4, {"v": 1})
    assert store.load("cam2") == (-1, None)  # sources are separate
    ttl = client.pttl(Keys(settings.namespace).track_state("cam1"))
    assert 0 < ttl <= 60_000


def test_a_save_retried_after_a_lost_reply_is_not_refused(transport):
    """Transport.call runs a script again after a reconnect; if the first try was applied and
    only its reply lost, the retry (same token) answers "saved", and writes nothing new. Any
    other save of the frame is still refused."""
    store = TrackStore(transport, ttl_s=60, answers_kept=4)
    assert store.save("cam", 5, {"v": 1}, answer=("f5", {"picks": [1]}), token="try")
    assert store.save("cam", 5, {"v": 1}, answer=("f5", {"picks": [1]}), token="try")
    assert not store.save("cam", 5, {"v": 2}, answer=("f5", {"picks": [2]}), token="other")
    assert not store.save("cam", 5, {"v": 1})  # a fresh token: another worker's save
    assert store.load("cam") == (5, {"v": 1}) and store.answer("cam", "f5") == {"picks": [1]}
    assert store.save("cam", 6, {"v": 3}, token="try")  # a later frame is a new save
    assert not store.save("cam", 5, {"v": 1}, token="try")  # ...and the old one is now stale


def test_two_workers_alternating_keep_one_tracker(transport, settings):
    """Frames of one source handled by two workers in turn, each rebuilding the tracker and
    the evidence from Redis: the ids equal those of one tracker kept in memory."""
    store = TrackStore(transport)
    memory = SourceTracker()
    for seq, (boxes, scores, _) in enumerate(scene(30, seed=4)):
        expected = memory.update(boxes, scores)
        last, state = store.load("drone")
        assert last == seq - 1
        tracker = SourceTracker.from_state(state["tracker"] if state else None)
        evidence = Evidence.from_state(state["evidence"] if state else None)
        ids = tracker.update(boxes, scores)
        evidence.update(seq, "a plane", {int(t): float(s)
                                         for t, s in zip(ids, scores, strict=True) if t >= 0})
        assert ids.tolist() == expected.tolist()
        assert store.save("drone", seq, {"tracker": tracker.state(),
                                         "evidence": evidence.to_state()})


def test_embedding_cache_round_trip_ttl_and_cap(transport, client, settings):
    keys = Keys(settings.namespace)
    cache = EmbeddingCache(transport, ttl_s=30, max_tracks=3)
    rng = np.random.default_rng(0)
    embs = {t: rng.standard_normal(16).astype(np.float32) for t in range(1, 6)}
    box = np.array([1, 2, 30, 40], np.float32)
    assert cache.put("cam", {1: CachedEmbedding(0, box, embs[1]),
                             2: CachedEmbedding(1, box, embs[2])}) == 0
    got = cache.get("cam", [1, 2, 9])
    assert set(got) == {1, 2}
    assert got[2].seq == 1 and np.array_equal(got[2].embedding, embs[2])
    assert np.array_equal(got[1].box, box)
    # Re-scoring track 1 later makes 2 the oldest: the cap of 3 evicts 2, then 3.
    assert cache.put("cam", {1: CachedEmbedding(5, box, embs[1]),
                             3: CachedEmbedding(2, box, embs[3])}) == 0
    assert cache.put("cam", {4: CachedEmbedding(6, box, embs[4])}) == 1
    assert set(cache.get("cam", range(1, 6))) == {1, 3, 4}
    assert cache.put("cam", {5: CachedEmbedding(7, box, embs[5])}) == 1
    assert set(cache.get("cam", range(1, 6))) == {1, 4, 5}
    assert cache.size("cam") == 3
    assert client.zcard(keys.embeds_order("cam")) == 3
    assert 0 < client.pttl(keys.embeds("cam")) <= 30_000
    assert 0 < client.pttl(keys.embeds_order("cam")) <= 30_000
    assert cache.get("cam", []) == {} and cache.put("cam", {}) == 0
    with pytest.raises(ValueError):
        EmbeddingCache(transport, max_tracks=0)


def test_a_redis_restart_is_waited_out_not_raised(settings, tmp_path):
    """The store's calls go through the Transport: each call below finds Redis killed (AOF on),
    waits, and answers once it is back, with what was saved before the kill."""
    box = np.array([1, 2, 30, 40], np.float32)
    with EmbeddedRedis(tmp_path / "redis", persist=True) as server:
        t = Transport(settings, url=server.url)
        store, cache = TrackStore(t, ttl_s=60), EmbeddingCache(t, ttl_s=60)
        assert store.save("cam", 1, {"v": 1}, answer=("f1", {"picks": [0]}))
        calls = [
            (lambda: store.load("cam"), (1, {"v": 1})),
            (lambda: store.save("cam", 2, {"v": 2}, answer=("f2", {"picks": [1]})), True),
            (lambda: cache.put("cam", {7: CachedEmbedding(2, box, np.ones(4, np.float32))}), 0),
            (lambda: store.answer("cam", "f2"), {"picks": [1]}),
            (lambda: cache.size("cam"), 1),
        ]
        for n, (call, expected) in enumerate(calls, start=1):
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            got = []
            caller = threading.Thread(target=lambda call=call, got=got: got.append(call()))
            caller.start()
            wait_for(lambda n=n: t.outages == n, timeout=30, what="the call finding Redis down")
            server.restart()
            caller.join(timeout=30)
            assert got == [expected], n
        assert store.load("cam") == (2, {"v": 2})
        t.close()
