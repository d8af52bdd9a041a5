"""Faults in track mode mid-clip lose no frame, double none and keep track ids stable: the
source's tracker lives in Redis, so a restarted worker continues it, and the track stage reaches
that state through the Transport, so a Redis restart or a dropped connection is waited out."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.common.trackstore import TrackStore
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
from spotline.producer.client import Client
from spotline.stages import libs
from tests.conftest import FAST
from tests.faultlib import held_by, results, results_by_frame, settled, wait_for

OUTAGE_S = 1.5  # how long Redis stays down: longer than the track worker takes for a batch
# The track stage's Redis calls, all through common/transport.py: its state and embedding cache
# (common/trackstore.py) and the source's memory for `spotline ask` (common/trackmemory.py)
STORE_CALLS = ("hash get", "hash size", "track state save", "embedding cache put", "memory add")

FRAMES = 24
CAPTIONS = ("red bus", "a person")
# Short visibility timeout: the killed worker's frames are claimed quickly; two frames a batch.
TRACK = {**FAST, "tta": False, "upscale": False, "max_det": 4, "tracking": True,
         "track_keyframe_every": 4, "batch_track": 2, "visibility_timeout_ms": 1500}


def test_killing_the_track_worker_mid_clip(settings: Settings) -> None:
    assets = libs.ultralytics_assets()
    # A cut, then a still shot: the tracker's ids on the still shot are not a fresh tracker's.
    clip = [(assets / "zidane.jpg").read_bytes()] * 3 + [(assets / "bus.jpg").read_bytes()] * (
        FRAMES - 3)
    with EmbeddedRedis() as server:
        s = settings.replace(redis_url=server.url, **TRACK)
        pipe = LocalPipeline(s)
        with pipe as url:
            t = Transport(s, url=url)
            ids, held = publish_killing_track(t, pipe, clip, CAPTIONS)
            per_frame = settled(t, pipeline_stages(s), ids, timeout=240)
            got = results(t)
            dead = t.r.xlen(t.keys.dead)
            last, state = TrackStore(t).load("drone")
    assert sum(per_frame.values()) == FRAMES and set(per_frame) == set(ids), "each frame once"
    assert dead == 0 and not [r.error for r in got.values() if r.error]
    answers = [got[f] for f in ids]
    print(f"\ntrack worker SIGKILLed holding {held} frame(s); track ids per frame: "
          f"{[a.track_ids for a in answers]}")
    # The state was never lost: the tracker has seen (or skipped) every frame of the clip.
    assert state is not None and last == state["source"]["seq"] == FRAMES
    assert state["source"]["tracker"]["frame_id"] == FRAMES
    # On the still shot, after the hysteresis settled, every caption keeps its track.
    still = [a.track_ids for a in answers[8:] if min(a.track_ids) >= 0]
    assert len(still) >= FRAMES - 8 - 2 and len(set(still)) == 1, still


def publish_killing_track(t: Transport, pipe: LocalPipeline, clip: list[bytes],
                          captions: Sequence[str]) -> tuple[list[str], int]:
    """Publish ``clip`` from source "drone", SIGKILLing the track worker halfway through:
    (the frame ids, how many frames the worker held when killed)."""
    client, ids, held = Client(t), [], 0
    for i, image in enumerate(clip):
        ids.append(client.publish(image, captions, source_id="drone"))
        if i == len(clip) // 2:
            held = kill_track_worker(t, pipe)
    return ids, held


def kill_track_worker(t: Transport, pipe: LocalPipeline) -> int:
    """SIGKILL the track worker, preferably while it holds frames; wait for its restart.
    Returns how many frames it held."""
    assert pipe.supervisor is not None
    child = next(c for c in pipe.supervisor.children if c.stage == "track")
    proc, restarts = child.proc, child.restarts
    assert proc is not None and proc.poll() is None
    try:
        wait_for(lambda: held_by(t, "track", proc.pid) > 0, timeout=20, every=0.002)
    except AssertionError:
        pass  # an idle worker is a fair victim too
    held = held_by(t, "track", proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: child.restarts == restarts + 1, timeout=30, what="track worker restart")
    return held


class ClipProducer(threading.Thread):
    """Publishes a clip from one source through the Python client with at most ``window``
    frames unanswered, so the track worker always holds frames when a fault lands."""

    def __init__(self, t: Transport, clip: list[bytes], window: int = 4) -> None:
        super().__init__(daemon=True, name="clip-producer")
        self.t, self.client, self.clip, self.window = t, Client(t), clip, window
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def answered(self) -> int:
        return self.t.length(self.t.keys.results)

    def run(self) -> None:
        try:
            for i, image in enumerate(self.clip):
                wait_for(lambda i=i: i - self.answered() < self.window, timeout=120,
                         what="results to catch up", every=0.01)
                self.ids.append(self.client.publish(image, CAPTIONS, source_id="drone"))
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def test_track_mode_rides_out_a_kill_a_redis_restart_and_a_client_kill(
        settings: Settings, tmp_path: Path, capfd) -> None:
    """(a) SIGKILL the track worker, (b) SIGKILL Redis (AOF on) and restart it after an
    outage, (c) CLIENT KILL every worker's connections, all while the track worker holds frames
    of the clip: every frame answered once, none an error, and the tracker saw every frame
    once (its frame count is the clip's), with the same track ids before and after."""
    frames = 36
    assets = libs.ultralytics_assets()
    clip = [(assets / "zidane.jpg").read_bytes()] * 3 + [(assets / "bus.jpg").read_bytes()] * (
        frames - 3)
    with EmbeddedRedis(tmp_path / "redis", persist=True) as server:
        s = settings.replace(redis_url=server.url, **TRACK)
        pipe = LocalPipeline(s)
        with pipe as url:
            t = Transport(s, url=url)
            admin = Transport(s, url=url)  # CLIENT KILL skips its own connection
            producer = ClipProducer(Transport(s, url=url), clip)
            producer.start()
            wait_for(lambda: producer.answered() >= 6, timeout=120, what="first results")
            held = kill_track_worker(t, pipe)
            wait_for(lambda: producer.answered() >= 16, timeout=120, what="results after kill")
            before = set(results_by_frame(t))
            track = track_pid(pipe)
            wait_for(lambda: held_by(t, "track", track) > 0, timeout=30, every=0.002,
                     what="the track worker holding frames")
            assert server.proc is not None
            server.proc.kill()  # SIGKILL: a crash, no shutdown save; the AOF has every write
            server.proc.wait()
            published = len(producer.ids)
            time.sleep(OUTAGE_S)  # the outage itself (not a wait for a condition)
            server.restart()
            t.call(t.ping, "reconnect")  # the test's own links, as the workers' do
            wait_for(lambda: producer.answered() >= 26, timeout=120, what="results after restart")
            wait_for(lambda: held_by(t, "track", track) > 0, timeout=30, every=0.002,
                     what="the track worker holding frames")
            dropped = admin.call(lambda: admin.r.client_kill_filter(_type="normal",
                                                                    skipme=True), "kill")
            producer.join(timeout=180)
            assert producer.error is None, f"producer failed: {producer.error!r}"
            ids = producer.ids
            per_frame = settled(t, pipeline_stages(s), ids, timeout=120)
            got = results(t)
            dead = t.length(t.keys.dead)
            last, state = TrackStore(t).load("drone")
            restarts = {c.name: c.restarts for c in pipe.supervisor.children}  # type: ignore
    logs = capfd.readouterr().err
    # What the track worker was doing when it found Redis gone (common/transport.py's line)
    waited = sorted({line.split("during ")[1].split(" (")[0] for line in logs.splitlines()
                     if f"pid={track} " in line and "redis unreachable during" in line})
    answers = [got[f] for f in ids]
    print(f"\ntrack faults: frames={len(ids)} results={sum(per_frame.values())} "
          f"errors={sum(1 for r in got.values() if r.error)} dead={dead}; killed the track "
          f"worker holding {held}; Redis down {OUTAGE_S}s; CLIENT KILL dropped {dropped}; "
          f"restarts {restarts}; the track worker waited out Redis during {waited}")
    print(f"track ids per frame: {[a.track_ids for a in answers]}")
    assert len(ids) == frames and per_frame == {fid: 1 for fid in ids}, "each frame once"
    assert not [r.error for r in got.values() if r.error], "no error results"
    assert dead == 0, "nothing dead-lettered"
    assert dropped >= 5 and set(waited) & set(STORE_CALLS), "the outage reached the track state"
    assert sum(restarts.values()) == 1, "only the killed worker restarted"
    # The tracker saw each frame once: none lost with the worker or Redis, none applied twice.
    assert state is not None and last == state["source"]["seq"] == frames
    assert state["source"]["tracker"]["frame_id"] == frames
    # On the still shot, after the hysteresis settled, every caption keeps its track: the same
    # ids on frames answered before the Redis restart and on frames published after it.
    still = [a.track_ids for a in answers[8:] if min(a.track_ids) >= 0]
    assert len(still) >= frames - 8 - 2 and len(set(still)) == 1, still
    ids_before = {got[f].track_ids for f in ids[8:] if f in before}
    ids_after = {got[f].track_ids for f in ids[published:]}
    assert ids_before and ids_before == ids_after, (ids_before, ids_after)


def track_pid(pipe: LocalPipeline) -> int:
    assert pipe.supervisor is not None
    proc = next(c for c in pipe.supervisor.children if c.stage == "track").proc
    assert proc is not None
    return proc.pid
