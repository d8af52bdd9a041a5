"""Kills of the track stage's worker mid-clip lose no frame and keep track ids stable: the
source's tracker lives in Redis, so the restarted worker continues it."""

from __future__ import annotations

import os
import signal

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.common.trackstore import TrackStore
from spotline.common.transport import Transport
from spotline.producer.client import Client
from spotline.stages import libs
from spotline.up import LocalPipeline, pipeline_stages
from tests.conftest import FAST
from tests.faultlib import drained, held_by, results, results_by_frame, wait_for

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
            client = Client(t)
            ids = []
            for i, image in enumerate(clip):
                ids.append(client.publish(image, CAPTIONS, source_id="drone"))
                if i == FRAMES // 2:
                    held = kill_track_worker(t, pipe)
            client.await_results(ids, timeout=240)
            wait_for(lambda: drained(t, pipeline_stages(s)), timeout=60, what="drained inboxes")
            per_frame = results_by_frame(t)
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
