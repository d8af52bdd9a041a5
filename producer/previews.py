"""Small JPEG previews of published frames, for the gateway's live view (producer/live.py).

The pipeline keeps no frame image after detect, so the producer that has the image keeps a
sample: at most one frame per source every ``every_s`` seconds is shrunk to ``max_side`` pixels
and stored under ``keys.preview(frame_id)`` with a TTL. When that frame's result comes out of
the collector, the live view draws the result on it. Memory in Redis stays bounded: about
``ttl_s / every_s`` previews of ~20-60 kB per source.

A preview is stored with the source it belongs to (msgpack ``{"source": id, "jpeg": bytes}``),
so the live view serves a frame only under its own source (tenants: producer/access.py).

Producers also count the frames they drop or reject per source in the ``keys.counters`` hash
(fields ``dropped:<source>`` and ``rejected:<source>``), where the live view reads them.
"""

from __future__ import annotations

import logging
import threading
import time

import cv2
import msgpack
import numpy as np

from ..common.errors import SpotlineError
from ..common.transport import Transport

log = logging.getLogger(__name__)

DROP_REASONS = ("dropped", "rejected")


def shrink_jpeg(image: bytes, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """A JPEG of ``image`` whose longer side is at most ``max_side``; and the original size."""
    buf = np.frombuffer(image, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise SpotlineError("not a decodable image")
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise SpotlineError("JPEG encoding failed")
    return out.tobytes(), (w, h)


class Previews:
    """Writes rate-limited previews per source (thread-safe) and per-source drop counts."""

    def __init__(self, transport: Transport, every_s: float = 0.5, max_side: int = 640,
                 quality: int = 75, ttl_s: int = 30) -> None:
        self.t = transport
        self.every_s = every_s
        self.max_side = max_side
        self.quality = quality
        self.ttl_s = ttl_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, source_id: str) -> bool:
        """True (and the source's clock restarted) when a preview of this source is due."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(source_id, -1e9) < self.every_s:
                return False
            if len(self._last) > 10_000:  # sources come and go: keep the table bounded
                self._last.clear()
            self._last[source_id] = now
            return True

    def offer(self, frame_id: str, source_id: str, image: bytes) -> bool:
        """Store a preview of this frame if one of its source is due. Never raises: a preview
        is a convenience, and a frame that cannot make one is still published."""
        if self.every_s < 0 or not self.due(source_id):
            return False
        try:
            jpeg, _size = shrink_jpeg(image, self.max_side, self.quality)
        except (SpotlineError, cv2.error) as exc:  # the stages report bad images, not us
            log.debug("frame=%s no preview: %s", frame_id, exc)
            return False
        key = self.t.keys.preview(frame_id)
        record = msgpack.packb({"source": source_id, "jpeg": jpeg}, use_bin_type=True)
        try:
            self.t.set_value(key, record, ttl_s=self.ttl_s)
        except SpotlineError as exc:
            log.debug("frame=%s preview not stored: %s", frame_id, exc)
            return False
        return True

    def get(self, frame_id: str, source_id: str) -> bytes | None:
        """The preview of a frame of ``source_id``; None when there is none, or the frame is
        another source's."""
        raw = self.t.get(self.t.keys.preview(frame_id))
        if not raw:
            return None
        try:
            record = msgpack.unpackb(bytes(raw), raw=False)
        except (ValueError, msgpack.UnpackException):
            return None
        if not isinstance(record, dict) or record.get("source") != source_id:
            return None
        jpeg = record.get("jpeg")
        return bytes(jpeg) if isinstance(jpeg, bytes) else None

    def count_drop(self, source_id: str, reason: str = "dropped") -> None:
        """Count a frame a producer dropped (backpressure) or rejected (bad input)."""
        if reason not in DROP_REASONS:
            raise ValueError(f"reason must be one of {DROP_REASONS}")
        try:
            self.t.increment_field(self.t.keys.counters, f"{reason}:{source_id}")
        except SpotlineError as exc:
            log.debug("drop of %s not counted: %s", source_id, exc)

    def drops(self) -> dict[str, dict[str, int]]:
        """{source: {"dropped": n, "rejected": m}} from the counters hash."""
        out: dict[str, dict[str, int]] = {}
        for field, v in self.t.fields(self.t.keys.counters).items():
            reason, _, source = field.partition(":")
            if reason in DROP_REASONS and source:
                out.setdefault(source, {r: 0 for r in DROP_REASONS})[reason] = int(v)
        return out
