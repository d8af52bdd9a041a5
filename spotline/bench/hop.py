"""The transport micro-benchmark: one pipeline hop (encode → commit script XADD + ack →
XREADGROUP → decode) for a 10-crop entry and a 1520×870 JPEG frame, over TCP and a unix
socket."""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from spotline.common.codec import decode, encode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope, new_frame_id
from spotline.common.settings import Settings
from spotline.common.transport import Output, Transport

from .probes import (
    percentiles,
)


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


HOP_PHASES = ("encode", "commit", "read", "decode")


def round_trip(t: Transport, env: Envelope, iterations: int,
               samples: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """One pipeline hop, timed per message: encode → the commit script (XADD the entry and
    ack + delete the previous one, as a worker does) → XREADGROUP → decode. Appends seconds
    to ``samples`` (``hop`` and each phase) and returns it."""
    stage = "bench"
    stream = t.keys.inbox(stage)
    t.ensure_group(stage)
    samples = samples if samples is not None else {k: [] for k in ("hop", *HOP_PHASES)}
    prev: list[str] = []
    for i in range(iterations + 10):
        t0 = time.perf_counter()
        payload = encode(env)
        t1 = time.perf_counter()
        t.commit(stage, [Output(stream, env.frame_id, payload)], prev)
        t2 = time.perf_counter()
        entries = t.read(stage, "bench", 1, 1000, 0)
        t3 = time.perf_counter()
        decode(entries[0].payload)
        t4 = time.perf_counter()
        prev = [entries[0].id]
        if i >= 10:  # warm-up excluded
            for key, dt in zip(samples, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3),
                               strict=True):
                samples[key].append(dt)
    t.commit(stage, [], prev)
    return samples


def _hop_figure(name: str, size: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    hop = percentiles(samples["hop"])
    return {"name": name, "bytes": size, "n": hop["n"], "p50_ms": hop["p50_ms"],
            "p99_ms": hop["p99_ms"], "mean_ms": hop["mean_ms"],
            "phases_p50_ms": {k: float(np.percentile(samples[k], 50) * 1000)
                              for k in HOP_PHASES}}


def transport_bench(settings: Settings, iterations: int = 300, rounds: int = 6) -> dict[str, Any]:
    """The hop for a 10-crop entry and a 1520×870 JPEG over TCP and over a unix socket, in
    interleaved rounds (TCP first, then the unix socket first, ...) so that a change in the
    machine's load touches both alike."""
    messages = {"10 crops 96x96x3 uint8": _crops_message(),
                "1520x870 JPEG frame": _jpeg_message()}
    out: dict[str, Any] = {}
    with EmbeddedRedis(unix_socket=True) as server:
        urls = {"tcp": server.tcp_url, "unix": server.unix_url}
        clients = {kind: Transport(settings, url=url) for kind, url in urls.items() if url}
        samples = {(kind, name): {k: [] for k in ("hop", *HOP_PHASES)}
                   for kind in clients for name in messages}
        per_round = max(1, iterations // rounds)
        for r in range(rounds):
            for kind in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
                for name, env in messages.items():
                    round_trip(clients[kind], env, per_round, samples[(kind, name)])
        for kind, t in clients.items():
            out[kind] = [_hop_figure(name, len(encode(env)), samples[(kind, name)])
                         for name, env in messages.items()]
            t.close()
        out["pipeline_url"] = "unix" if server.url == server.unix_url else "tcp"
    return out


# --- memory sampling --------------------------------------------------------------------------
