"""Reading and re-queuing the dead-letter stream (`spotline dead list|retry`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .settings import Settings
from .transport import DATA_FIELD, FRAME_FIELD, Transport


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered entry."""

    id: str
    stream: str
    stage: str
    entry_id: str
    frame: str
    reason: str
    deliveries: int
    time: float
    payload: bytes

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.time)


def _row(entry_id: bytes | str, f: dict[bytes, bytes]) -> DeadLetter:
    def text(key: bytes) -> str:
        return f.get(key, b"").decode("utf-8", "replace")
    return DeadLetter(
        id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        stream=text(b"stream"), stage=text(b"stage"), entry_id=text(b"id"),
        frame=text(b"frame"), reason=text(b"reason"),
        deliveries=int(text(b"deliveries") or 0), time=float(text(b"time") or 0),
        payload=f.get(b"payload", b""))


class DeadLetters:
    """The dead-letter stream of one namespace."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport

    @classmethod
    def connect(cls, settings: Settings, url: str) -> DeadLetters:
        return cls(Transport(settings, url=url))

    def list(self, count: int = 100) -> list[DeadLetter]:
        rows = self.t.call(lambda: self.t.r.xrange(self.t.keys.dead, count=count), "dead list")
        return [_row(i, f) for i, f in rows]

    def count(self) -> int:
        return int(self.t.call(lambda: self.t.r.xlen(self.t.keys.dead), "dead count"))

    def retry(self, ids: list[str] | None = None) -> int:
        """Put entries back on the stream they came from (all when ``ids`` is None)."""
        rows = self.list(count=1_000_000) if ids is None else [
            _row(i, f) for i in ids
            for _, f in self.t.call(lambda i=i: self.t.r.xrange(self.t.keys.dead, i, i), "dead")]
        for row in rows:
            def move(row: DeadLetter = row) -> None:
                pipe = self.t.r.pipeline(transaction=True)
                pipe.xadd(row.stream, {FRAME_FIELD: row.frame.encode(), DATA_FIELD: row.payload})
                pipe.xdel(self.t.keys.dead, row.id)
                pipe.execute()
            self.t.call(move, "dead retry")
        return len(rows)
