"""Ask the past under faults: the memory lives in Redis beside the track state, so a track
worker SIGKILLed mid-clip loses none of it, and the answer after the clip is the one the
pipeline's own per-frame picks give; a Redis SIGKILLed and restarted on its AOF keeps it, the
same answers before and after, and it grows on with each frame kept once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from spotline.common.codec import decode_state
from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.common.trackmemory import OVERHEAD, MemoryStore
from spotline.common.trackstore import TrackStore
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
from spotline.producer.client import Client
from spotline.results.ask import Asker
from spotline.train.demo import apply_demo_models
from tests.faultlib import held_by, results, settled, wait_for
from tests.test_ask import clip_frames
from tests.test_track_faults import publish_killing_track, track_pid

FRAMES = 24
TRACK = {"warmup": 1, "tracking": True, "batch_track": 2, "visibility_timeout_ms": 1500,
         "ask_embed_every_s": 0.0}


def test_memory_survives_a_track_worker_killed_mid_clip(settings: Settings, tmp_path) -> None:
    frames = clip_frames(tmp_path, frames=FRAMES)
    captions = frames[0].captions
    with EmbeddedRedis() as server:
        s = apply_demo_models(settings).replace(redis_url=server.url, **TRACK)
        pipe = LocalPipeline(s)
        with pipe as url:
            t = Transport(s, url=url)
            ids, _ = publish_killing_track(t, pipe, [f.image for f in frames], captions)
            settled(t, pipeline_stages(s), ids, timeout=240)
            got = results(t)
            stats = MemoryStore.for_settings(s, t).stats("drone")
            asker = Asker(s.replace(redis_url=url), t)
            answers = {c: asker.ask(c, ["drone"], since_s=3600) for c in captions}
    assert stats["records"] == FRAMES, "every frame kept once, none lost to the kill"
    checked = 0
    for c, caption in enumerate(captions):
        picked = Counter(got[f].track_ids[c] for f in ids
                         if got[f].track_ids[c] >= 0 and not got[f].absent[c])
        if sum(picked.values()) < FRAMES // 2:
            continue  # "not in view" most of the clip
        usual = picked.most_common(1)[0][0]
        ans = answers[caption]
        assert ans.seen and ans.matches[0].track_id == usual, (caption, ans.as_json())
        checked += 1
    assert checked >= 2


def kept(t: Transport, store: MemoryStore, source: str) -> dict[str, Any]:
    """What the memory holds of ``source``: its records (oldest first), their seqs, the stats,
    and the size of the records hash (beside the order set that ``stats`` counts)."""
    raws = store.since(source, 0.0)
    return {"raws": raws, "seqs": [decode_state(r)["s"] for r in raws],
            "stats": store.stats(source), "hash": t.hash_size(t.keys.memory(source))}


def test_memory_survives_redis_killed_and_restarted_with_aof(settings: Settings,
                                                             tmp_path: Path) -> None:
    """Half a clip tracked, then Redis SIGKILLed (no shutdown save) and restarted on its AOF:
    the same records and the same answers as before the kill. The second half then goes
    through with Redis SIGKILLed again while the track worker holds frames of it: the memory
    grows on to the clip's end, each tracked frame's record there once, none lost. (A frame
    that the outage held up until later frames of its source were tracked is answered
    untracked, as track mode answers any frame later than ``track_reorder_ms``: it has a
    result but no record.)"""
    frames = clip_frames(tmp_path, frames=FRAMES)
    captions = frames[0].captions
    half = FRAMES // 2
    with EmbeddedRedis(tmp_path / "redis", persist=True) as server:
        s = apply_demo_models(settings).replace(redis_url=server.url, **TRACK)
        pipe = LocalPipeline(s)
        with pipe as url:
            t = Transport(s, url=url)
            client = Client(t)
            store = MemoryStore.for_settings(s, t)
            asker = Asker(s.replace(redis_url=url), t)
            ids = [client.publish(f.image, captions, source_id="drone") for f in frames[:half]]
            settled(t, pipeline_stages(s), ids, timeout=240)
            now = time.time()  # one window for every question, so that answers compare

            def answers() -> dict[str, dict[str, Any]]:
                out = {}
                for c in (*captions, "purple cross"):
                    body = asker.ask(c, ["drone"], since_s=3600.0, now=now).as_json()
                    body.pop("took_ms")
                    out[c] = body
                return out

            before, asked_before = kept(t, store, "drone"), answers()
            server.restart(hard=True)  # SIGKILL, then the same port and AOF file
            t.call(t.ping, "reconnect")
            after, asked_after = kept(t, store, "drone"), answers()

            ids += [client.publish(f.image, captions, source_id="drone") for f in frames[half:]]
            track = track_pid(pipe)
            wait_for(lambda: held_by(t, "track", track) > 0
                     or t.length(t.keys.results) >= FRAMES, timeout=120, every=0.002,
                     what="the track worker holding frames of the second half")
            held = held_by(t, "track", track)  # 0 only if it answered them all before
            server.restart(hard=True)
            t.call(t.ping, "reconnect")
            per_frame = settled(t, pipeline_stages(s), ids, timeout=240)
            whole = kept(t, store, "drone")
            answers_saved = TrackStore(t)  # the track stage saves each tracked frame's answer
            tracked = [n for n, fid in enumerate(ids, 1)
                       if answers_saved.answer("drone", fid) is not None]
            got = results(t)
            last = asker.ask(captions[0], ["drone"], since_s=3600.0)
    print(f"\nask memory across Redis kills: {len(before['seqs'])} record(s) before, "
          f"{len(after['seqs'])} after the restart, {len(whole['seqs'])} at the clip's end "
          f"(the second kill found the track worker holding {held} frame(s)); "
          f"{sum(per_frame.values())} result(s) for {len(ids)} frame(s); answered late, "
          f"untracked: {sorted(set(range(1, FRAMES + 1)) - set(tracked)) or 'none'}")
    assert per_frame == {fid: 1 for fid in ids} and not [r.error for r in got.values()
                                                         if r.error]
    # the restart kept every record, byte for byte, and so every answer
    assert before["seqs"] == list(range(1, half + 1)) and before["hash"] == half
    assert after == before
    assert asked_after == asked_before
    assert any(a["seen"] for a in asked_before.values()), asked_before
    # then it grew on to the clip's end: each tracked frame's record once (no seq twice, none
    # missing), the first half's unchanged, the order set, the hash and the byte counter in step
    assert tracked[:half] == list(range(1, half + 1)) and tracked[-1] == FRAMES
    assert whole["seqs"] == tracked
    assert whole["raws"][:half] == before["raws"]
    assert whole["hash"] == whole["stats"]["records"] == len(tracked)
    assert whole["stats"]["bytes"] == sum(len(r) + OVERHEAD for r in whole["raws"])
    assert last.searched["drone"]["frames"] == len(tracked)
