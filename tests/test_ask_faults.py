"""Ask the past under faults: the memory lives in Redis beside the track state, so a track
worker SIGKILLed mid-clip loses none of it, and the answer after the clip is the one the
pipeline's own per-frame picks give."""

from __future__ import annotations

from collections import Counter

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.common.trackmemory import MemoryStore
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
from spotline.results.ask import Asker
from spotline.train.demo import apply_demo_models
from tests.faultlib import results, settled
from tests.test_ask import clip_frames
from tests.test_track_faults import publish_killing_track

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
