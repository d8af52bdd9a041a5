"""End to end: separate worker processes over a real redis-server with tiny models give exactly
one result per frame, with the same boxes as the in-process reference (parity)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from spotline.bench import synthetic_frame
from spotline.common.codec import decode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.pipeline.demo import DEMO_FRAMES, demo_images
from spotline.pipeline.reference import Reference
from spotline.pipeline.supervisor import LocalPipeline
from spotline.producer.client import Client
from tests.conftest import FAST


@pytest.fixture(scope="module")
def frames() -> list[tuple[bytes, tuple[str, ...]]]:
    photos = [(img, DEMO_FRAMES[name]) for name, img in demo_images().items()]
    synthetic = [(synthetic_frame(i), ("grey missile", "yellow helicopter")) for i in range(3)]
    return photos + synthetic


@pytest.mark.parametrize("upscale", [True, False], ids=["upscale-on", "upscale-off"])
def test_streaming_matches_reference(redis_server: EmbeddedRedis, settings: Settings,
                                     frames: list[tuple[bytes, tuple[str, ...]]],
                                     upscale: bool) -> None:
    s = settings.replace(redis_url=redis_server.url, upscale=upscale, batch_detect=2,
                         batch_score=3, crops_per_part=4, **FAST)
    with LocalPipeline(s) as url:
        client = Client.connect(url, s)
        ids = [client.publish(img, caps, source_id="test") for img, caps in frames]
        results = client.await_results(ids, timeout=300)
        stream = Counter(decode(f[b"d"]).frame_id
                         for _, f in client.t.r.xrange(client.keys.results))
    assert stream == Counter(ids), "exactly one result per frame"
    reference = Reference(s).identify([img for img, _ in frames], [caps for _, caps in frames])
    boxes_seen = 0
    for fid, ref, (_img, caps) in zip(ids, reference, frames, strict=True):
        got = results[fid]
        assert got.error is None and got.captions == caps == ref.captions
        assert len(got.boxes) == len(caps), "one box per caption"
        assert got.fallback == ref.fallback
        np.testing.assert_allclose(np.array(got.boxes), np.array(ref.boxes), atol=0.05)
        np.testing.assert_allclose(np.array(got.scores), np.array(ref.scores), atol=1e-4)
        stages = [row[0] for row in got.trace]
        assert stages[0] == "detect" and stages[-1] == "collect"
        assert ("upscale" in stages) == (upscale and not got.fallback)
        boxes_seen += not got.fallback
    assert boxes_seen >= 2, "the tiny detector should find boxes on the demo photos"
