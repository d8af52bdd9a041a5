"""Where a source's past lives for `spotline ask`: Redis, beside its track state, so a worker's
death loses none of it and a Redis restart keeps it with AOF, as the rest.

Per source, a hash of frame records (field: the frame's seq; value: bytes made by
stages/memory.py), a sorted set of those seqs by capture time, and a byte counter. One script
adds a record and drops the oldest ones: those older than the retention (``ask_retention_min``
before the newest record's time) and, while the source holds more than its byte cap
(``ask_max_bytes_per_source``), the oldest. Adding is idempotent (HSETNX: a frame tracked
again after a worker's death, or a script retried after a reconnect, counts once). The keys
expire a retention after the last record, so a source gone quiet leaves nothing behind.

Everything goes through the ``Transport`` (common/transport.py), as the track store does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec import split_strings
from .settings import Settings
from .transport import Transport

OVERHEAD = 48  # bytes counted per record beyond its value: its field, its sorted-set entry

_DROP = """
local function drop(seqs)
  local freed = 0
  for _, s in ipairs(seqs) do
    freed = freed + redis.call('HSTRLEN', KEYS[1], s) + tonumber(ARGV[8])
    redis.call('HDEL', KEYS[1], s)
    redis.call('ZREM', KEYS[2], s)
  end
  if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
  return #seqs
end
"""

# KEYS: records hash, order zset, bytes counter, sources set. ARGV: seq, time, record,
# retention cutoff time, byte cap, ttl ms, source id, overhead. Returns records dropped.
_ADD = _DROP + """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('INCRBY', KEYS[3], string.len(ARGV[3]) + tonumber(ARGV[8]))
end
local dropped = drop(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4]))
while tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 15)
  if #oldest == 0 then redis.call('SET', KEYS[3], 0) break end
  local over = tonumber(redis.call('GET', KEYS[3])) - tonumber(ARGV[5])
  local take = {}
  for _, s in ipairs(oldest) do
    if over <= 0 then break end
    over = over - redis.call('HSTRLEN', KEYS[1], s) - tonumber(ARGV[8])
    take[#take + 1] = s
  end
  dropped = dropped + drop(take)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
redis.call('SADD', KEYS[4], ARGV[7])
return dropped
"""

# KEYS: records hash, order zset. ARGV: from time. The records since then, oldest first, as a
# few msgpack arrays of up to 1,000 records each (cmsgpack, in C): one reply item a record made
# the client parse 6,000 items for 10 minutes of a 10 frames/s source, most of a read's time.
_READ = """
local seqs = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')
local out = {}
for i = 1, #seqs, 1000 do
  local part = redis.call('HMGET', KEYS[1], unpack(seqs, i, math.min(i + 999, #seqs)))
  out[#out + 1] = cmsgpack.pack(part)
end
return out
"""

# KEYS: sources set. ARGV: the memory-order key's prefix. The sources whose memory is there
# still (those whose keys expired leave the set).
_SOURCES = """
local out = {}
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. s) == 1 then out[#out + 1] = s
  else redis.call('SREM', KEYS[1], s) end
end
return out
"""

# KEYS: records hash, order zset, bytes counter. Returns {records, bytes, oldest, newest}.
_STATS = """
local n = redis.call('ZCARD', KEYS[2])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
return {n, tonumber(redis.call('GET', KEYS[3]) or '0'), first[2] or '', last[2] or ''}
"""


class MemoryStore:
    """Each source's frame records for asking the past, bounded in time and bytes."""

    def __init__(self, transport: Transport, retention_s: float = 1800.0,
                 max_bytes: int = 8 * 1024 * 1024) -> None:
        if retention_s <= 0 or max_bytes <= 0:
            raise ValueError("retention_s and max_bytes must be > 0")
        self.t = transport
        self.keys = transport.keys
        self.retention_s = float(retention_s)
        self.max_bytes = int(max_bytes)
        self._add = transport.script(_ADD)
        self._read = transport.script(_READ)
        self._sources = transport.script(_SOURCES)
        self._stats = transport.script(_STATS)

    @classmethod
    def for_settings(cls, settings: Settings, transport: Transport | None = None) -> MemoryStore:
        return cls(transport or Transport(settings), settings.ask_retention_min * 60.0,
                   settings.ask_max_bytes_per_source)

    def _keys(self, source_id: str) -> list[str]:
        k = self.keys
        return [k.memory(source_id), k.memory_order(source_id), k.memory_bytes(source_id)]

    def add(self, source_id: str, seq: int, t: float, record: bytes) -> int:
        """Keep a frame's record (once per seq); returns how many old records were dropped."""
        args: list[Any] = [int(seq), repr(float(t)), record, repr(t - self.retention_s),
                           self.max_bytes, int(self.retention_s * 1000), source_id, OVERHEAD]
        keys = [*self._keys(source_id), self.keys.memory_sources]
        return int(self.t.run_script(self._add, keys, args, "memory add"))

    def since(self, source_id: str, t: float) -> list[bytes]:
        """The records of frames captured at ``t`` or later, oldest first."""
        parts = self.t.run_script(self._read, self._keys(source_id)[:2], [repr(float(t))],
                                  "memory read")
        return [r for part in parts for r in split_strings(part)]

    def sources(self) -> list[str]:
        """The sources that have a memory now."""
        prefix = self.keys.memory_order("")
        raw = self.t.run_script(self._sources, [self.keys.memory_sources], [prefix],
                                "memory sources")
        return sorted(s.decode() if isinstance(s, bytes) else str(s) for s in raw)

    def stats(self, source_id: str) -> dict[str, float]:
        """records, bytes (as counted for the cap), oldest and newest capture time."""
        n, size, first, last = self.t.run_script(self._stats, self._keys(source_id), [],
                                                 "memory stats")
        return {"records": int(n), "bytes": int(size),
                "oldest": float(first) if first else 0.0, "newest": float(last) if last else 0.0}


def read_all(store: MemoryStore, sources: Sequence[str], t: float) -> dict[str, list[bytes]]:
    """Each source's records since ``t``."""
    return {s: store.since(s, t) for s in sources}
