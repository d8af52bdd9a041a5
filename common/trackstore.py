"""Where a source's tracking lives between frames: Redis, so any worker can continue a source
and a worker's death loses nothing (docs/architecture.md, "Tracks").

- ``TrackStore``: one hash per source with the tracking state (the tracker's arrays and the
  evidence, as the codec's ``encode_state`` bytes) and the sequence number of the frame that
  made it. ``save`` is a compare-and-set on that number: a state only replaces an older one,
  so a worker that took a frame over from a dead or slow one can never be overwritten by it.
  The same script keeps the frame's answer (by frame id, the last ``answers_kept``): a frame
  delivered again after its state was saved is answered from it, never tracked twice.
- ``EmbeddingCache``: per source, each track's last image embedding with the frame and box it
  was computed on, kept with a TTL and at most ``max_tracks`` tracks per source (the tracks
  scored longest ago go first).

Both go through a ``Transport`` (common/transport.py), like every other Redis call: a Redis
restart or a dropped connection is retried with its reconnects and bounded outage. Retrying is
safe: a save carries a token, so a save retried after its reply was lost finds its own write
and says "saved" again (nothing is applied twice); the cache's writes are plain sets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codec import decode_state, encode_state
from .settings import Settings
from .transport import Transport

# Trim a hash and its order zset to the newest ``limit`` fields; how many it removed.
_CAP = """
local function cap(hash, order, limit)
  local over = redis.call('ZCARD', order) - tonumber(limit)
  if over <= 0 then return 0 end
  local old = redis.call('ZRANGE', order, 0, over - 1)
  redis.call('ZREMRANGEBYRANK', order, 0, over - 1)
  redis.call('HDEL', hash, unpack(old))
  return over
end
"""

# KEYS[1] state hash, KEYS[2] answers hash, KEYS[3] answers order zset; ARGV: seq, state
# bytes, ttl ms, answers kept, the save's token, then frame id and answer bytes (or nothing).
# The state and the frame's answer are written together or not at all: 1 saved (or saved
# already by this very save, retried after its reply was lost: same seq, same token), 0 a state
# of this or a later frame is there from another save.
_SAVE = _CAP + """
local cur = redis.call('HMGET', KEYS[1], 'seq', 'by')
if cur[1] and tonumber(cur[1]) >= tonumber(ARGV[1]) then
  if tonumber(cur[1]) == tonumber(ARGV[1]) and cur[2] == ARGV[5] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'state', ARGV[2], 'by', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if #ARGV >= 7 then
  redis.call('HSET', KEYS[2], ARGV[6], ARGV[7])
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[6])
  cap(KEYS[2], KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
"""

# KEYS[1] embeddings hash, KEYS[2] order zset; ARGV: ttl ms, max tracks, then per track:
# field, value, seq. Returns how many tracks the cap evicted.
_PUT = _CAP + """
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
end
local over = cap(KEYS[1], KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return over
"""


class TrackStore:
    """The tracking state of each source, saved after each frame of it."""

    def __init__(self, transport: Transport, ttl_s: float = 3600.0,
                 answers_kept: int = 1024) -> None:
        if answers_kept < 1:
            raise ValueError(f"answers_kept must be >= 1, got {answers_kept}")
        self.t = transport
        self.keys = transport.keys
        self.ttl_ms = int(ttl_s * 1000)
        self.answers_kept = answers_kept
        self._save = transport.script(_SAVE)

    def load(self, source_id: str) -> tuple[int, dict[str, Any] | None]:
        """(sequence number of the last frame saved, its state); (-1, None) for a new source."""
        seq, raw = self.t.hash_get(self.keys.track_state(source_id), ["seq", "state"])
        if seq is None or raw is None:
            return -1, None
        return int(seq), decode_state(raw)

    def save(self, source_id: str, seq: int, state: dict[str, Any],
             answer: tuple[str, dict[str, Any]] | None = None, *,
             token: str | None = None) -> bool:
        """Store the state after frame ``seq`` and, in the same step, that frame's answer
        (frame id, answer; the last ``answers_kept`` are kept); False (nothing written) if
        another save of that or a later frame is already stored.

        ``token`` names this save (a fresh one by default): the transport runs the script
        again after a reconnect, and a save whose reply was lost then finds its own token and
        answers True, as the first try did."""
        k = self.keys
        keys = [k.track_state(source_id), k.track_answers(source_id),
                k.track_answers_order(source_id)]
        args: list[Any] = [int(seq), encode_state(state), self.ttl_ms, self.answers_kept,
                           token or uuid.uuid4().hex]
        if answer is not None:
            args += [answer[0], encode_state(answer[1])]
        return bool(self.t.run_script(self._save, keys, args, "track state save"))

    def answer(self, source_id: str, frame_id: str) -> dict[str, Any] | None:
        """The answer saved with the state for a frame (None: none kept)."""
        (raw,) = self.t.hash_get(self.keys.track_answers(source_id), [frame_id])
        return None if raw is None else decode_state(raw)


@dataclass(frozen=True)
class CachedEmbedding:
    """A track's image embedding, and the frame and box (xyxy) it was computed on."""

    seq: int
    box: np.ndarray
    embedding: np.ndarray

    def to_bytes(self) -> bytes:
        return encode_state({"seq": int(self.seq),
                             "box": np.asarray(self.box, np.float32).reshape(4),
                             "emb": np.asarray(self.embedding, np.float32).reshape(-1)})

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedEmbedding:
        data = decode_state(raw)
        return cls(int(data["seq"]), data["box"], data["emb"])


class EmbeddingCache:
    """Image embeddings of a source's tracks, reused while the crop has not changed."""

    def __init__(self, transport: Transport, ttl_s: float = 600.0,
                 max_tracks: int = 256) -> None:
        if max_tracks < 1:
            raise ValueError(f"max_tracks must be >= 1, got {max_tracks}")
        self.t = transport
        self.keys = transport.keys
        self.ttl_ms = int(ttl_s * 1000)
        self.max_tracks = max_tracks
        self._put = transport.script(_PUT)

    def get(self, source_id: str, track_ids: Iterable[int]) -> dict[int, CachedEmbedding]:
        """The cached embeddings of those tracks that have one."""
        ids = [int(t) for t in track_ids]
        if not ids:
            return {}
        raws = self.t.hash_get(self.keys.embeds(source_id), [str(t) for t in ids])
        return {t: CachedEmbedding.from_bytes(raw) for t, raw in zip(ids, raws, strict=True)
                if raw is not None}

    def put(self, source_id: str, entries: Mapping[int, CachedEmbedding]) -> int:
        """Cache embeddings (track id → entry); returns how many old tracks the cap evicted.
        Idempotent but for that count: a retry sets the same fields to the same values."""
        if not entries:
            return 0
        args: list[Any] = [self.ttl_ms, self.max_tracks]
        for track, entry in entries.items():
            args += [str(int(track)), entry.to_bytes(), int(entry.seq)]
        keys = [self.keys.embeds(source_id), self.keys.embeds_order(source_id)]
        return int(self.t.run_script(self._put, keys, args, "embedding cache put"))

    def size(self, source_id: str) -> int:
        """Tracks cached for a source."""
        return self.t.hash_size(self.keys.embeds(source_id))


def open_stores(settings: Settings, answers_kept: int = 1024
                ) -> tuple[TrackStore, EmbeddingCache]:
    """The track stage's state and cache on one connection of their own to
    ``settings.redis_url``, behind a ``Transport`` (its reconnects, its bounded outage)."""
    t = Transport(settings)
    ttl = settings.track_state_ttl_s
    return TrackStore(t, ttl, answers_kept), EmbeddingCache(t, ttl, settings.track_cache_tracks)
