"""Who may use the gateway, and how fast: API keys and a per-key token bucket in Redis.

Keys come from ``api_keys`` (comma-separated) and ``api_keys_file`` (one a line, ``#``
comments). The file is re-read when its modification time or size changes, so keys rotate
without a restart. A request carries its key as ``X-API-Key: KEY`` or
``Authorization: Bearer KEY`` (FastAPI's own security schemes read them, and the OpenAPI page
shows both). With no key configured the gateway is open, and says so at start-up.

The rate limit is a token bucket per key (per client address when open) kept in one Redis hash
by a Lua script that reads Redis' clock, so any number of gateway replicas share the bucket.
Neither a key nor its hash prefix is logged: buckets are named by a SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..common.errors import ConfigError, TransportError
from ..common.settings import Settings
from ..common.transport import Transport

log = logging.getLogger(__name__)

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="an API key (or send it as Authorization: Bearer)")
BEARER = HTTPBearer(auto_error=False, description="an API key as a bearer token")

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, cost. Returns {allowed, seconds to wait}.
# Redis' own clock (TIME) so every replica agrees; the bucket expires once it would be full.
TOKEN_BUCKET = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured keys; the file's are re-read when it changes (checked on each use)."""

    def __init__(self, settings: Settings) -> None:
        self.inline = frozenset(k.strip() for k in settings.api_keys.split(",") if k.strip())
        self.path = Path(settings.api_keys_file) if settings.api_keys_file else None
        self._stamp: tuple[int, int] | None = None
        self._from_file: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        if self.path is not None and not self.path.is_file():
            raise ConfigError(f"api_keys_file {str(self.path)!r} does not exist")
        self._refresh()

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:  # mid-rotation (rename): keep the keys we have
            log.warning("api_keys_file unreadable (%s); keeping the %d keys read before",
                        type(exc).__name__, len(self._from_file))
            return
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            lines = self.path.read_text().splitlines()
            self._from_file = frozenset(
                k for line in lines if (k := line.split("#", 1)[0].strip()))
            if self._stamp is not None:
                log.info("api_keys_file changed: %d keys now", len(self._from_file))
            self._stamp = stamp

    @property
    def open(self) -> bool:
        self._refresh()
        return not (self.inline or self._from_file)

    def check(self, key: str) -> bool:
        """Whether ``key`` is one of the keys (compared in constant time)."""
        self._refresh()
        found = False
        for known in (*self.inline, *self._from_file):
            found |= hmac.compare_digest(known.encode(), key.encode())
        return found


@dataclass
class RateLimiter:
    """A token bucket per caller in Redis, shared by every gateway replica."""

    transport: Transport
    rate: float
    burst: int

    def __post_init__(self) -> None:
        self._script = self.transport.script(TOKEN_BUCKET)

    def take(self, caller: str) -> float:
        """0 when the caller may go on, else the seconds until it may."""
        bucket = self.transport.keys.ratelimit(caller)
        allowed, wait = self.transport.call(
            lambda: self._script(keys=[bucket], args=[self.rate, self.burst, 1]), "rate limit")
        return 0.0 if int(allowed) else float(wait)


class Access:
    """The gateway's guard: ``Depends(access)`` on a route checks the key and the rate."""

    def __init__(self, settings: Settings, transport: Transport) -> None:
        self.keys = KeyRing(settings)
        self.limiter = (RateLimiter(transport, settings.rate_limit, settings.rate_burst)
                        if settings.rate_limit > 0 else None)
        if self.keys.open:
            log.warning("no API keys configured (api_keys / api_keys_file): the gateway is OPEN "
                        "to anyone who can reach it")

    def __call__(self, request: Request,
                 api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None
                 ) -> str:
        """The caller's id (a digest of its key, or its address when open); 401 or 429."""
        key = api_key or (bearer.credentials if bearer else None)
        if self.keys.open:
            caller = "addr-" + digest(request.client.host if request.client else "unknown")
        elif key and self.keys.check(key):
            caller = "key-" + digest(key)
        else:
            raise HTTPException(401, "a valid API key is required (X-API-Key header or "
                                "Authorization: Bearer)" if key is None else "invalid API key",
                                headers={"WWW-Authenticate": "Bearer"})
        if self.limiter is not None:
            try:
                wait = self.limiter.take(caller)
            except TransportError as exc:
                raise HTTPException(503, f"pipeline unavailable: {exc}") from None
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise HTTPException(429, f"rate limit of {self.limiter.rate:g} requests/s "
                                    f"(burst {self.limiter.burst}) exceeded; retry in {retry}s",
                                    headers={"Retry-After": str(retry)})
        return caller
