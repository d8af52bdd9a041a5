"""`spotline bench`: figures measured in one run on this machine (never pass/fail)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from spotline.common.codec import decode, encode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope, new_frame_id
from spotline.common.settings import Settings
from spotline.common.transport import Transport


@dataclass
class Figure:
    """Latency percentiles of one measured operation, in milliseconds."""

    name: str
    bytes: int
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass
class BenchReport:
    """What `spotline bench` measured."""

    figures: list[Figure] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'message':<34} {'bytes':>10} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}"]
        for f in self.figures:
            lines.append(f"{f.name:<34} {f.bytes:>10} {f.n:>5} {f.p50_ms:>8.3f} {f.p99_ms:>8.3f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"figures": [asdict(f) for f in self.figures]}, indent=2)


def _crops_message() -> Envelope:
    rng = np.random.default_rng(0)
    crops = tuple(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(10))
    return Envelope(frame_id=new_frame_id(), captions=("grey and white light aircraft",),
                    image_size=(1520, 870), boxes=rng.random((10, 4), dtype=np.float32),
                    det_scores=rng.random(10, dtype=np.float32), crops=crops, nparts=1)


def _jpeg_message() -> Envelope:
    rng = np.random.default_rng(1)
    # A noisy synthetic frame: JPEG of noise is the worst case for size.
    img = cv2.GaussianBlur(rng.integers(0, 255, (870, 1520, 3), dtype=np.uint8), (5, 5), 0)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return Envelope(frame_id=new_frame_id(), captions=("grey missile",), image=buf.tobytes(),
                    image_size=(1520, 870))


def round_trip(t: Transport, env: Envelope, name: str, iterations: int) -> Figure:
    """encode → XADD → XREADGROUP → decode → XACK+XDEL, timed per message."""
    stage = "bench"
    stream = t.keys.inbox(stage)
    t.ensure_group(stage)
    size = len(encode(env))
    times = []
    for i in range(iterations + 10):
        t0 = time.perf_counter()
        payload = encode(env)
        t.add(stream, env.frame_id, payload)
        entries = t.read(stage, "bench", 1, 1000, 0)
        decode(entries[0].payload)
        t1 = time.perf_counter()
        t.commit(stage, [], [entries[0].id])
        if i >= 10:  # warm-up excluded
            times.append((t1 - t0) * 1000)
    arr = np.array(times)
    return Figure(name, size, len(arr), float(np.percentile(arr, 50)),
                  float(np.percentile(arr, 99)), float(arr.mean()))


def transport_bench(settings: Settings, iterations: int = 300) -> BenchReport:
    """Codec + Redis round trip for a 10-crop entry and a 1520×870 JPEG frame."""
    with EmbeddedRedis() as server:
        t = Transport(settings, url=server.url)
        report = BenchReport()
        report.figures.append(round_trip(t, _crops_message(), "10 crops 96x96x3 uint8",
                                         iterations))
        report.figures.append(round_trip(t, _jpeg_message(), "1520x870 JPEG frame", iterations))
        t.close()
    return report
