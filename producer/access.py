"""Who may use the gateway, for what, and how fast: API keys with scopes, tenants, a per-key
token bucket and a per-address limit on failed authentications, both in Redis.

Keys come from ``api_keys`` (comma-separated) and ``api_keys_file`` (one a line, ``#``
comments). An entry is ``KEY`` or ``KEY:SCOPE+SCOPE``; the scopes are ``identify`` (POST
/identify), ``read`` (the live view) and ``admin`` (``/sources`` and every other control
route). A bare ``KEY`` gets ``identify+read``: never ``admin`` unless it says so. The file is
re-read when its modification time or size changes, so keys rotate without a restart. A key
file that holds no key (empty, comments only, every key removed, or gone) CLOSES the gateway:
configured keys that are not there let nobody in. A request carries its key as
``X-API-Key: KEY`` or ``Authorization: Bearer KEY``.

With no key configured at all the gateway is open (every caller has every scope, one tenant):
allowed on a loopback address, elsewhere only with ``insecure_open_gateway`` (producer/gateway.py
refuses to start otherwise).

Tenants: each key's ``/identify`` frames are published as source ``http-<12 hex of
sha256(key)>`` (never the key); a caller with ``read`` sees its own ``http-*`` source and the
operator's feeds (every source not named ``http``/``http-*``), and ``read`` with ``admin`` sees
every source.

Rate limits are token buckets kept in Redis hashes by one Lua script that reads Redis' clock,
so any number of gateway replicas share them: ``rate_limit`` per key (one token a request, and
on /identify one a distinct image), and ``auth_fail_per_minute`` per client address for failed
authentications (on by default, whatever ``rate_limit`` is). Neither a key nor its hash prefix
is logged: buckets are named by a SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError, TransportError
from ..common.settings import Settings
from ..common.transport import Transport

log = logging.getLogger(__name__)

SCOPES = ("identify", "read", "admin")
DEFAULT_SCOPES = frozenset({"identify", "read"})  # a bare KEY: least privilege, never admin
ALL_SCOPES = frozenset(SCOPES)
HTTP_SOURCE = "http"  # /identify's source on an open gateway; keyed: http-<digest prefix>

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, cost. Returns {allowed, seconds to wait}.
# Redis' own clock (TIME) so every replica agrees; the bucket expires once it would be full.
# A cost of 0 only asks whether a token is there (at least one), taking none.
TOKEN_BUCKET = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local need = math.max(cost, 1)
local allowed, wait = 0, 0
if tokens >= need then
  tokens = tokens - cost
  allowed = 1
else
  wait = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_source(key: str) -> str:
    """The source id of a key's /identify frames: a digest prefix, never the key."""
    return f"{HTTP_SOURCE}-{digest(key)[:12]}"


def is_http_source(source_id: str) -> bool:
    """Whether a source holds /identify frames (some caller's, not the operator's)."""
    return source_id == HTTP_SOURCE or source_id.startswith(HTTP_SOURCE + "-")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine (a name other than localhost: no)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its bucket id, scopes and /identify source."""

    id: str
    scopes: frozenset[str]
    source: str

    def can(self, scope: str) -> bool:
        return scope in self.scopes

    def may_read(self, source_id: str) -> bool:
        """Its own /identify source and the operator's feeds; with admin, every source."""
        if not self.can("read"):
            return False
        return self.can("admin") or source_id == self.source or not is_http_source(source_id)


def parse_entry(entry: str) -> tuple[str, frozenset[str]]:
    """``KEY`` or ``KEY:SCOPE+SCOPE`` -> (key, scopes); ConfigError naming the problem."""
    key, sep, scopes_text = entry.strip().rpartition(":")
    if not sep:
        key, scopes = entry.strip(), DEFAULT_SCOPES
    else:
        names = [s.strip() for s in scopes_text.split("+") if s.strip()]
        unknown = [s for s in names if s not in SCOPES]
        if unknown or not names:
            raise ConfigError(f"API key entry ending {':' + scopes_text!r}: scopes are "
                              f"{'+'.join(SCOPES)} (KEY or KEY:SCOPE+SCOPE), got "
                              f"{unknown or 'none'}")
        scopes = frozenset(names)
    if not key or any(c.isspace() or c in ",#" for c in key):
        raise ConfigError("an API key must be non-empty, without spaces, ',' or '#'")
    return key, scopes


def parse_keys(entries: list[str]) -> dict[str, frozenset[str]]:
    return dict(parse_entry(e) for e in entries if e.strip())


class KeyRing:
    """The configured keys and their scopes; the file's are re-read when it changes."""

    def __init__(self, settings: Settings) -> None:
        self.inline = parse_keys(settings.api_keys.split(","))
        self.path = Path(settings.api_keys_file) if settings.api_keys_file else None
        self._stamp: tuple[int, int] | None = None
        self._from_file: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        if self.path is not None:
            if not self.path.is_file():
                raise ConfigError(f"api_keys_file {str(self.path)!r} does not exist")
            self._read(strict=True)
            if not self._from_file and not self.inline:
                log.warning("api_keys_file holds no key: the gateway is CLOSED (every "
                            "authenticated route refuses) until keys are added")

    @property
    def configured(self) -> bool:
        """Keys were configured (inline or a file): the gateway is never open then."""
        return bool(self.inline) or self.path is not None

    def _read(self, strict: bool = False) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            lines = self.path.read_text().splitlines()
        except OSError as exc:  # gone or unreadable: nobody gets in through the file
            if self._from_file or self._stamp is not None:
                log.warning("api_keys_file unreadable (%s): its keys no longer let anyone in",
                            type(exc).__name__)
            self._from_file, self._stamp = {}, None
            return
        keys: dict[str, frozenset[str]] = {}
        for n, line in enumerate(lines, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                key, scopes = parse_entry(entry)
            except ConfigError as exc:
                if strict:
                    raise ConfigError(f"api_keys_file line {n}: {exc}") from None
                log.error("api_keys_file line %d ignored (it lets nobody in): %s", n, exc)
                continue
            keys[key] = scopes
        if self._stamp is not None:
            log.info("api_keys_file changed: %d keys now", len(keys))
            if not keys and not self.inline:
                log.warning("api_keys_file holds no key: the gateway is CLOSED")
        self._from_file, self._stamp = keys, stamp

    def _refresh(self) -> None:
        if self.path is not None:
            with self._lock:
                self._read()

    @property
    def open(self) -> bool:
        """No key configured anywhere: everyone is let in (a configured empty file: not open)."""
        return not self.configured

    def lookup(self, key: str) -> frozenset[str] | None:
        """The key's scopes, or None when it is not a key (compared in constant time against
        every key)."""
        self._refresh()
        with self._lock:
            known = [*self.inline.items(), *self._from_file.items()]
        found: frozenset[str] | None = None
        for candidate, scopes in known:
            if hmac.compare_digest(candidate.encode(), key.encode()):
                found = scopes if found is None else found | scopes
        return found

    def check(self, key: str) -> bool:
        """Whether ``key`` is one of the keys."""
        return self.lookup(key) is not None


@dataclass
class RateLimiter:
    """A token bucket per caller in Redis, shared by every gateway replica."""

    transport: Transport
    rate: float
    burst: int

    def __post_init__(self) -> None:
        self._script = self.transport.script(TOKEN_BUCKET)

    def take(self, caller: str, cost: int = 1) -> float:
        """0 when the caller may go on (``cost`` tokens taken), else the seconds until it may.
        A cost of 0 takes nothing: it asks whether at least one token is there."""
        bucket = self.transport.keys.ratelimit(caller)
        allowed, wait = self.transport.call(
            lambda: self._script(keys=[bucket], args=[self.rate, self.burst, cost]),
            "rate limit")
        return 0.0 if int(allowed) else float(wait)


class Refused(Exception):
    """An answer the guard gives instead of the route: status, message, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _too_many(wait: float, what: str) -> Refused:
    retry = max(1, math.ceil(wait))
    return Refused(429, f"{what}; retry in {retry}s", {"Retry-After": str(retry)})


class Access:
    """The gateway's keys and limits. ``authenticate`` is called by the guard middleware
    (producer/guard.py) before any body is read; ``charge`` by /identify once it knows how
    many frames a request holds."""

    def __init__(self, settings: Settings, transport: Transport) -> None:
        self.keys = KeyRing(settings)
        self.limiter = (RateLimiter(transport, settings.rate_limit, settings.rate_burst)
                        if settings.rate_limit > 0 else None)
        per_minute = settings.auth_fail_per_minute
        self.failures = (RateLimiter(transport, per_minute / 60.0,
                                     max(1, math.ceil(per_minute)))
                         if per_minute > 0 else None)

    def authenticate(self, key: str | None, address: str) -> Caller:
        """The caller a key stands for, or Refused: 429 while its address has failed too
        often (even with a good key: a guess that works must not show), 401 otherwise."""
        if self.keys.open:
            return Caller("addr-" + digest(address), ALL_SCOPES, HTTP_SOURCE)
        failures_key = "authfail-" + digest(address)
        if self.failures is not None:
            wait = self._limit(self.failures, failures_key, 0)
            if wait > 0:
                raise _too_many(wait, "too many failed authentications from this address")
        scopes = self.keys.lookup(key) if key else None
        if scopes is None:
            if self.failures is not None:
                self._limit(self.failures, failures_key, 1)
            raise Refused(401, "a valid API key is required (X-API-Key header or "
                          "Authorization: Bearer)" if not key else "invalid API key",
                          {"WWW-Authenticate": "Bearer"})
        return Caller("key-" + digest(key or ""), scopes, tenant_source(key or ""))

    def admit(self, caller: Caller, cost: int = 1) -> None:
        """Take ``cost`` tokens from the caller's bucket (0: only check one is there);
        Refused 429 when they are not there."""
        if self.limiter is None:
            return
        wait = self._limit(self.limiter, caller.id, cost)
        if wait > 0:
            what = "request" if cost <= 1 else f"request's {cost + 1} frames"
            raise _too_many(wait, f"rate limit of {self.limiter.rate:g} tokens/s (burst "
                            f"{self.limiter.burst}; a token a request, on /identify a token a "
                            f"distinct image) exceeded by this {what}")

    def max_cost(self) -> int | None:
        """The most tokens one request may take (the burst), None when not limited."""
        return self.limiter.burst if self.limiter is not None else None

    @staticmethod
    def _limit(limiter: RateLimiter, bucket: str, cost: int) -> float:
        try:
            return limiter.take(bucket, cost)
        except TransportError as exc:
            raise Refused(503, f"pipeline unavailable: {exc}") from None
