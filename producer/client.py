"""A small Python client: publish frames, await or subscribe to their results.

    from .client import Client
    client = Client.connect("redis://localhost:6379/0")
    fid = client.publish(open("bus.jpg", "rb").read(), ["red bus", "man in a hat"])
    result = client.await_result(fid, timeout=30)
    print(result.boxes)  # one [left, top, width, height] per caption
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..common.codec import decode, encode
from ..common.envelope import Envelope, Result, new_frame_id
from ..common.errors import DecodeError, SpotlineError
from ..common.images import image_size as read_image_size
from ..common.limits import check_frame
from ..common.meta import check_meta
from ..common.metrics import Metrics
from ..common.settings import Settings, load_settings
from ..common.topology import FRAMES
from ..common.transport import DATA_FIELD, Transport


class ResultTimeout(SpotlineError):
    """No result arrived in time."""


class Client:
    """Publish frames into a pipeline's frames stream and read its results.

    Every frame published is counted in ``metrics`` (``spotline_frames_published_total``
    {source, via}; serve it with ``client.metrics.serve(port)``): ``publish`` is the one
    function the CLI, the gateway, the feeds and jobs all call. ``via`` says which of them this
    client is (``client`` when used directly)."""

    def __init__(self, transport: Transport, metrics: Metrics | None = None,
                 via: str = "client") -> None:
        self.t = transport
        self.metrics = metrics or Metrics()
        self.via = via
        self.keys = transport.keys
        self.settings = transport.settings
        self._group_ready = False
        from spotline.producer.previews import Previews

        self.previews = Previews(transport)  # sampled frame images for the live view

    @classmethod
    def connect(cls, url: str, settings: Settings | None = None,
                metrics: Metrics | None = None, via: str = "client") -> Client:
        return cls(Transport(settings or load_settings(), url=url), metrics, via)

    def publish(self, image: bytes, captions: Sequence[str], source_id: str = "default",
                capture_time: float | None = None, frame_id: str | None = None,
                image_size: tuple[int, int] = (0, 0), sequenced: bool | None = None,
                meta: dict[str, Any] | None = None) -> str:
        """Publish one encoded image (JPEG/PNG bytes) with its captions; returns the frame id.

        ``sequenced`` (default: the ``tracking`` setting) numbers the frame within its source
        (a Redis counter per source), the order track mode follows; unrelated images (the
        seed's /identify) should not be.

        The frame must pass the limits every producer and the gateway check (size, pixels,
        captions: ``sources.validate_frame``), else InputError; an ``image_size`` given means
        the caller has already validated it, and only the cheap checks run again.

        ``meta``: a small JSON object (at most ``meta_max_bytes`` as JSON) returned unchanged on
        the frame's result (docs/results.md); anything else is an InputError and nothing is
        published."""
        meta = check_meta(meta, self.settings.meta_max_bytes)
        check_frame(image, captions, self.settings)
        if tuple(image_size) == (0, 0):
            image_size = read_image_size(bytes(image), self.settings)
        captions = tuple(captions)
        if not self._group_ready:
            self.t.ensure_group(FRAMES)
            self._group_ready = True
        seq = -1
        if self.settings.tracking if sequenced is None else sequenced:
            seq = self.t.increment(self.keys.seq(source_id))
        env = Envelope(frame_id=frame_id or new_frame_id(), source_id=source_id,
                       capture_time=time.time() if capture_time is None else capture_time,
                       captions=captions, image=bytes(image), image_size=image_size, seq=seq,
                       meta=meta)
        self.t.add(self.keys.inbox(FRAMES), env.frame_id, encode(env))
        self.metrics.count_published(source_id, self.via)
        self.previews.offer(env.frame_id, source_id, env.image or b"")
        return env.frame_id

    def get_result(self, frame_id: str) -> Result | None:
        """The stored result of a frame, or None (not finished, or expired)."""
        raw = self.t.get(self.keys.result(frame_id))
        return _as_result(raw) if raw else None

    def await_result(self, frame_id: str, timeout: float = 60.0) -> Result:
        """Wait for one frame's result."""
        return self.await_results([frame_id], timeout)[frame_id]

    def await_results(self, frame_ids: Iterable[str], timeout: float = 60.0) -> dict[str, Result]:
        """Wait for the results of several frames; raises ResultTimeout naming the missing."""
        wanted = set(frame_ids)
        last = self._last_result_id()
        found: dict[str, Result] = {}
        for fid in list(wanted):
            res = self.get_result(fid)
            if res is not None:
                found[fid] = res
        deadline = time.monotonic() + timeout
        while len(found) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(wanted - set(found))
                raise ResultTimeout(f"no result after {timeout:.0f}s for {len(missing)} frame(s): "
                                    f"{missing[:5]}")
            for entry_id, result in self._read_results(last, int(min(left, 1.0) * 1000) + 1):
                last = entry_id
                if result is not None and result.frame_id in wanted:
                    found[result.frame_id] = result
        return found

    def subscribe(self, start: str = "$", block_ms: int = 1000,
                  source_id: str | None = None) -> Iterator[tuple[str, Result]]:
        """Yield (entry id, result) from the results stream, forever: from ``start`` ("$": new
        ones only, "0": replay what the stream still holds)."""
        last = self._last_result_id() if start == "$" else start
        while True:
            for entry_id, result in self._read_results(last, block_ms):
                last = entry_id
                if result is not None and (source_id is None or result.source_id == source_id):
                    yield entry_id, result

    def read_results(self, start: str = "0", count: int = 1000) -> list[tuple[str, Result]]:
        """Results already in the stream after ``start`` (no waiting)."""
        rows = self.t.entries(self.keys.results, f"({start}" if start != "0" else "-", count=count)
        results = [(i, _as_result(f.get(DATA_FIELD, b""))) for i, f in rows]
        return [(i, r) for i, r in results if r is not None]

    def _last_result_id(self) -> str:
        return self.t.last_id(self.keys.results)

    def _read_results(self, last: str, block_ms: int, count: int = 500
                      ) -> list[tuple[str, Result | None]]:
        """XREAD after ``last``; undecodable entries come back as None so the caller moves on."""
        return [(entry_id, _as_result(fields.get(DATA_FIELD, b"")))
                for entry_id, fields in self.t.tail(self.keys.results, last, count, block_ms)]

    def backlog(self) -> int:
        """Frames published but not yet read by the pipeline (the backpressure signal)."""
        return self.t.backlog(FRAMES)

    def workers_alive(self) -> int:
        """Consumers of the frames inbox with a recent heartbeat."""
        return self.t.workers_alive(FRAMES)

    def close(self) -> None:
        self.t.close()


def _as_result(raw: bytes) -> Result | None:
    try:
        msg = decode(raw)
    except DecodeError:
        return None
    return msg if isinstance(msg, Result) else None
