"""Helpers of the reliability tests (test code only): waiting, synthetic frames, odd images,
and reading what a pipeline did back from Redis."""

from __future__ import annotations

import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable

import cv2
import numpy as np

from spotline.common.codec import decode
from spotline.common.envelope import Result
from spotline.common.transport import Transport
from spotline.producer.client import Client

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition",
             every: float = 0.05) -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(every)


def small_frame(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A small JPEG: a few coloured rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        colour = [int(c) for c in rng.integers(0, 255, 3)]
        cv2.rectangle(img, (x, y), (x + 30, y + 25), colour, -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` and has no pixel data (zero-sized when 0)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def huge_black_png(side: int = 20000) -> bytes:
    """A valid grey PNG of side×side pixels that is small on disk (~400 KB for 20000)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + one byte per pixel
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def results_by_frame(t: Transport) -> Counter[str]:
    """How many entries the results stream holds for each frame id."""
    return Counter(f[b"f"].decode() for _, f in t.r.xrange(t.keys.results))


def results(t: Transport) -> dict[str, Result]:
    out = {}
    for _, f in t.r.xrange(t.keys.results):
        res = decode(f[b"d"])
        assert isinstance(res, Result)
        out[res.frame_id] = res
    return out


def drained(t: Transport, stages: list[str]) -> bool:
    """Nothing unread and nothing pending in any of these inboxes."""
    return all(t.pending_count(s) == 0 and t.backlog(s) == 0 for s in stages)


def settled(t: Transport, stages: list[str], ids: list[str], timeout: float) -> Counter[str]:
    """Wait for every frame of ``ids`` to be answered, then for every inbox to drain with nothing
    pending (late duplicates surface by then): how many results each frame got."""
    Client(t).await_results(ids, timeout=timeout)
    wait_for(lambda: drained(t, stages), timeout=60, what="drained inboxes")
    return results_by_frame(t)


def held_by(t: Transport, stage: str, pid: int) -> int:
    """Entries of ``stage`` pending with the consumer of process ``pid`` (read, not acked)."""
    info = t.r.xpending(t.keys.inbox(stage), t.keys.group(stage))
    tag = f"-{pid}-"
    return sum(int(c["pending"]) for c in info.get("consumers") or []
               if tag in (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]))
