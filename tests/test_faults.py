"""Fault injection through separate worker processes over a real redis-server: workers of every
stage SIGKILLed mid-batch, client connections dropped, Redis restarted (with and without AOF),
entries delivered twice. Nothing is lost, nothing doubled, every frame answered once."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotline.common.codec import encode
from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.envelope import Envelope
from spotline.common.settings import Settings
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import Child, LocalPipeline, Supervisor, pipeline_stages
from spotline.producer.client import Client
from tests.conftest import FAST, spawn_worker
from tests.faultlib import (
    drained,
    held_by,
    results,
    results_by_frame,
    settled,
    small_frame,
    wait_for,
)

log = logging.getLogger(__name__)

FRAMES = 200
CAPTIONS = ("red box", "grey thing")
WINDOW = 12  # frames in flight
# Small batches and a short visibility timeout: kills land mid-batch and claims come quickly.
# crops_per_part=4: the tiny detector's 10 boxes make 3 parts per frame, so the collector joins
# parts across its own kill.
FAULTS = {**FAST, "tta": False, "upscale": True, "batch_detect": 2, "batch_upscale": 4,
          "batch_score": 4, "batch_collect": 8, "crops_per_part": 4,
          "visibility_timeout_ms": 1500}


class Producer(threading.Thread):
    """Publishes ``n`` frames through the Python client, at most WINDOW unanswered at a time,
    so every stage is busy all through the run (and the connection drop hits the producer)."""

    def __init__(self, url: str, settings: Settings, n: int) -> None:
        super().__init__(daemon=True, name="producer")
        self.client = Client.connect(url, settings)
        self.n = n
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def unanswered(self, published: int) -> int:
        t = self.client.t
        return published - t.call(lambda: t.r.xlen(t.keys.results), "results")

    def run(self) -> None:
        try:
            for i in range(self.n):
                wait_for(lambda i=i: self.unanswered(i) < WINDOW, timeout=120,
                         what="results to catch up", every=0.02)
                self.ids.append(self.client.publish(small_frame(i), CAPTIONS,
                                                    source_id="faults"))
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def kill_mid_batch(t: Transport, pipe: LocalPipeline, stage: str, rng: random.Random) -> str:
    """SIGKILL a random worker of ``stage``, preferably while it holds entries; wait for the
    supervisor to restart it. Returns a line for the report."""
    assert pipe.supervisor is not None
    child = rng.choice([c for c in pipe.supervisor.children if c.stage == stage])
    proc, restarts = child.proc, child.restarts
    assert proc is not None and proc.poll() is None
    try:
        wait_for(lambda: held_by(t, stage, proc.pid) > 0, timeout=8, every=0.002)
    except AssertionError:
        pass  # an idle worker is a fair victim too
    held = held_by(t, stage, proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: child.restarts == restarts + 1, timeout=30, what=f"{child.name} restart")
    return f"{child.name} pid {proc.pid} (holding {held} entries)"


def test_sigkill_workers_and_drop_connections(settings: Settings) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    plan = ["detect", "upscale", "score", "collect"]
    rng.shuffle(plan)
    with EmbeddedRedis() as server:
        s = settings.replace(redis_url=server.url, **FAULTS)
        pipe = LocalPipeline(s, workers={"detect": 2})
        with pipe as url:
            t = Transport(s, url=url)
            admin = Transport(s, url=url)  # CLIENT KILL skips its own connection
            producer = Producer(url, s, FRAMES)
            producer.start()
            kills, dropped = [], 0
            # Faults spread over the run: a kill every ~FRAMES/6 results, the drop in between.
            for i, stage in enumerate(plan):
                wait_for(lambda i=i: t.r.xlen(t.keys.results) >= (i + 1) * FRAMES // 6,
                         timeout=120, what="progress between faults")
                kills.append(kill_mid_batch(t, pipe, stage, rng))
                if i == 1:
                    dropped = admin.r.client_kill_filter(_type="normal", skipme=True)
            producer.join(timeout=120)
            assert producer.error is None, f"producer failed: {producer.error!r}"
            ids = producer.ids
            per_frame = settled(t, pipeline_stages(s), ids, timeout=150)
            got = results(t)
            dead = t.r.xlen(t.keys.dead)
            restarts = {c.name: c.restarts for c in pipe.supervisor.children}  # type: ignore
            alive = all(c.proc.poll() is None for c in pipe.supervisor.children)  # type: ignore
    report = (f"fault injection: frames sent={len(ids)} results={sum(per_frame.values())} "
              f"distinct frames answered={len(per_frame)} "
              f"twice={sum(1 for n in per_frame.values() if n > 1)} "
              f"missing={len(set(ids) - set(per_frame))} "
              f"errors={sum(1 for r in got.values() if r.error)} dead letters={dead}; "
              f"SIGKILLed {kills}; CLIENT KILL dropped {dropped} connections; "
              f"restarts {restarts}")
    print("\n" + report)
    log.warning(report)
    assert len(ids) == FRAMES and len(kills) >= 3 and dropped >= 5  # every worker's link
    assert sum(per_frame.values()) == len(ids), "one result per frame sent"
    assert set(per_frame) == set(ids) and max(per_frame.values()) == 1, "no frame twice"
    assert not [r.error for r in got.values() if r.error], "no frame failed"
    assert dead == 0, "nothing dead-lettered"
    assert alive and sum(restarts.values()) == len(kills), "restarted the killed, only them"


def test_redis_killed_and_restarted_with_aof_loses_nothing(settings: Settings,
                                                           tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", persist=True) as server:
        s = settings.replace(redis_url=server.url, **{**FAULTS, "upscale": False})
        pipe = LocalPipeline(s)
        with pipe as url:
            client = Client.connect(url, s)
            ids = [client.publish(small_frame(i), CAPTIONS) for i in range(60)]
            wait_for(lambda: client.t.r.xlen(client.keys.results) >= 10, timeout=60,
                     what="first results")
            server.restart(hard=True)  # SIGKILL mid-run, then the same port and AOF file
            per_frame = settled(client.t, pipeline_stages(s), ids, timeout=120)
            dead = client.t.r.xlen(client.keys.dead)
            children = pipe.supervisor.children  # type: ignore[union-attr]
            restarts = sum(c.restarts for c in children)
            alive = all(c.proc.poll() is None for c in children)  # type: ignore[union-attr]
    print(f"\nredis restart with AOF: frames={len(ids)} results={sum(per_frame.values())} "
          f"distinct={len(per_frame)} dead={dead} worker restarts={restarts}")
    assert per_frame == {fid: 1 for fid in ids}, "every frame answered exactly once"
    assert dead == 0
    assert alive and restarts == 0, "workers rode out the outage by reconnecting"


def publish_raw(t: Transport, frame_ids: list[str]) -> None:
    """Frames straight onto the frames stream (the stub detect never decodes the image)."""
    t.ensure_group("detect")
    for fid in frame_ids:
        env = Envelope(frame_id=fid, captions=("a red bus",), image=b"jpeg")
        t.add(t.keys.inbox("detect"), fid, encode(env))


def test_redis_restart_without_persistence_workers_carry_on(settings: Settings) -> None:
    with EmbeddedRedis() as server:
        t = Transport(settings, url=server.url)
        procs = [spawn_worker(settings, server.url, "detect",
                              stage_class="tests.stagelib:ToCollect"),
                 spawn_worker(settings, server.url, "collect")]
        try:
            wait_for(lambda: t.workers_alive("detect") and t.workers_alive("collect"),
                     what="workers up")
            publish_raw(t, ["a0", "a1", "a2"])
            wait_for(lambda: len(results_by_frame(t)) == 3, what="results before the restart")
            server.restart(hard=True)  # in-memory Redis: streams, groups, results all gone
            assert t.call(lambda: t.r.xlen(t.keys.results), "len") == 0
            publish_raw(t, ["b0", "b1", "b2"])
            wait_for(lambda: set(results_by_frame(t)) == {"b0", "b1", "b2"}, timeout=60,
                     what="results after the restart")
            assert [p.poll() for p in procs] == [None, None], "workers survived the restart"
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=30) for p in procs]
    assert codes == [0, 0]


def scrape(port: int, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_entry_claimed_from_a_slow_worker_gives_one_result(redis_server: EmbeddedRedis,
                                                           settings: Settings) -> None:
    """A worker that outlives the visibility timeout: another worker claims and finishes its
    entries, then the slow one commits them too. The collector drops the late copies."""
    s = settings.replace(visibility_timeout_ms=1000, batch_detect=4, max_wait_ms=100)
    url = redis_server.url
    t = Transport(s, url=url)
    ids = [f"f{i}" for i in range(4)]
    publish_raw(t, ids)
    port = free_port()
    collect = spawn_worker(s, url, "collect", "--metrics-port", str(port))
    slow = spawn_worker(s, url, "detect", "--burst", stage_class="tests.stagelib:SlowToCollect")
    try:
        wait_for(lambda: t.pending_count("detect") == 4, what="the slow worker's batch")
        fast = spawn_worker(s, url, "detect", "--burst", stage_class="tests.stagelib:ToCollect")
        assert fast.wait(timeout=60) == 0 and slow.wait(timeout=60) == 0
        assert results_by_frame(t) == {fid: 1 for fid in ids}
        # Both committed every frame: the collector saw each frame twice and answered once.
        wait_for(lambda: drained(t, ["collect"]), what="collector drained")
        wait_for(lambda: scrape(port, "spotline_entries_total",
                                {"stage": "collect", "outcome": "duplicate"}) == 4,
                 what="4 duplicates counted")
        # A copy of a part re-added long after the result is dropped too.
        late = Envelope(frame_id="f0", captions=("a red bus",))
        t.add(t.keys.inbox("collect"), "f0", encode(late))
        wait_for(lambda: scrape(port, "spotline_entries_total",
                                {"stage": "collect", "outcome": "duplicate"}) == 5,
                 what="the late copy dropped")
        assert drained(t, ["collect"]) and results_by_frame(t) == {fid: 1 for fid in ids}
        assert collect.poll() is None
    finally:
        collect.send_signal(signal.SIGTERM)
        collect.wait(timeout=30)


@pytest.mark.parametrize("script, words", [
    ("import time; time.sleep(60)", "was killed by SIGKILL"),
    ("raise SystemExit(3)", "exited with status 3"),
])
def test_supervisor_restarts_a_dead_child_and_says_so(settings: Settings, script: str,
                                                      words: str) -> None:
    sup = Supervisor(settings, "redis://unused")
    child = Child("score", 0, [sys.executable, "-c", script], dict(os.environ))
    sup.children.append(child)
    child.start()
    first = child.proc
    assert first is not None
    if "sleep" in script:
        first.kill()
    first.wait()
    try:
        (line,) = sup.check()
        assert line.startswith(f"worker score#0 (pid {first.pid}) {words}; restarted it as pid ")
        assert "restart #1" in line and "visibility_timeout_ms" in line
        assert child.proc is not first and child.restarts == 1
    finally:
        sup.stop(timeout=5)
