"""The dead-letter stream: an entry no worker can handle (undecodable, the wrong kind of
message, delivered too often) is moved there with its reason, and its frame, when known, is
still answered with an error. Operators list and retry them (`spotline dead list|retry`).

This module owns the whole record: its fields are written by ``dead_letter`` and read by
``DeadLetters`` below, and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .codec import decode
from .envelope import Envelope
from .settings import Settings
from .transport import DATA_FIELD, FRAME_FIELD, Entry, Output, Transport

# The record's fields: where the entry came from, why it is here, and the entry itself.
STREAM, STAGE, ID, FRAME = b"stream", b"stage", b"id", b"frame"
REASON, DELIVERIES, TIME, PAYLOAD = b"reason", b"deliveries", b"time", b"payload"


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


def record(entry: Entry, stage: str, reason: str,
           deliveries: int | None = None) -> dict[bytes, bytes]:
    """The dead-letter record of an entry: its stream, the stage (or sink group) that gave up
    on it, why, how often it was tried (its delivery count by default), and the entry."""
    return {
        STREAM: entry.stream.encode(), STAGE: stage.encode(), ID: entry.id.encode(),
        REASON: reason.encode("utf-8", "replace"),
        DELIVERIES: str(entry.deliveries if deliveries is None else deliveries).encode(),
        FRAME: (entry.frame_id or "").encode(), TIME: repr(time.time()).encode(),
        PAYLOAD: entry.payload,
    }


def dead_letter(t: Transport, stage: str, entry: Entry, reason: str,
                outputs: Sequence[Output] = ()) -> None:
    """Move an entry to the dead-letter stream with its reason (plus any outputs, such as the
    error answer for its frame) and ack it, in one atomic step; then cap the stream."""
    records = [(t.keys.dead, record(entry, stage, reason))]
    records += [(o.stream, {FRAME_FIELD: o.frame_id.encode(), DATA_FIELD: o.payload})
                for o in outputs]
    t.write(stage, records, [entry.id], "dead-letter")
    t.trim(t.keys.dead, t.settings.dead_maxlen)


def dead_letter_shared(t: Transport, group: str, entry: Entry, reason: str,
                       deliveries: int) -> None:
    """Dead-letter an entry of a stream other groups read too (a sink's, on the results
    stream): write the record and XACK the entry in ``group``, one atomic step, without XDEL;
    then cap the stream."""
    t.write_and_ack(entry.stream, group, [(t.keys.dead, record(entry, group, reason,
                                                               deliveries))],
                    [entry.id], delete=False, what="dead-letter")
    t.trim(t.keys.dead, t.settings.dead_maxlen)


def answer_for(entry: Entry, frame: str, error: str) -> Envelope:
    """The error envelope that answers a dead-lettered entry's frame: with the entry's own
    fields (source, captions, capture time) when its payload is an envelope, else bare (an
    undecodable payload, or a Result where an Envelope belongs). Never raises: whatever the
    payload does to the decoder, the frame is still answered."""
    try:
        msg = decode(entry.payload)
    except Exception:  # noqa: BLE001 - poison may break the decoder in any way
        msg = None
    if isinstance(msg, Envelope):
        return msg.replace(frame_id=frame, error=error)
    return Envelope(frame_id=frame, source_id="unknown", error=error)


def _row(entry_id: str, f: dict[bytes, bytes]) -> DeadLetter:
    def text(key: bytes) -> str:
        return f.get(key, b"").decode("utf-8", "replace")
    return DeadLetter(
        id=entry_id, stream=text(STREAM), stage=text(STAGE), entry_id=text(ID),
        frame=text(FRAME), reason=text(REASON), deliveries=int(text(DELIVERIES) or 0),
        time=float(text(TIME) or 0), payload=f.get(PAYLOAD, b""))


class DeadLetters:
    """The dead-letter stream of one namespace."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport

    @classmethod
    def connect(cls, settings: Settings, url: str) -> DeadLetters:
        return cls(Transport(settings, url=url))

    def list(self, count: int = 100) -> list[DeadLetter]:
        return [_row(i, f) for i, f in self.t.entries(self.t.keys.dead, count=count)]

    def count(self) -> int:
        return self.t.length(self.t.keys.dead)

    def retry(self, ids: list[str] | None = None) -> int:
        """Put entries back on the stream they came from (all when ``ids`` is None)."""
        dead = self.t.keys.dead
        rows = self.list(count=1_000_000) if ids is None else [
            _row(i, f) for wanted in ids for i, f in self.t.entries(dead, wanted, wanted)]
        for row in rows:
            self.t.move(dead, row.id, row.stream,
                        {FRAME_FIELD: row.frame.encode(), DATA_FIELD: row.payload})
        return len(rows)
