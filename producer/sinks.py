"""Result sinks: push every result to another system (`spotline sink webhook|mqtt URL`).

A sink is a consumer group of its own on the results stream (``sink-<name>``), so it sees every
result the collector publishes, at its own pace, and acknowledges a result only once the
receiver has taken it (HTTP 2xx; MQTT PUBACK at QoS 1). A sink that is down (killed, restarted,
its machine lost) loses nothing: on start it first re-sends what it had read but not
acknowledged, takes over what other consumers of its group left pending longer than the
visibility timeout, then reads new results. Delivery is at least once; the frame id is the
idempotency key (webhook headers ``webhook-id`` and ``X-Spotline-Frame``, field ``frame_id`` of
every payload). Webhooks are signed the Standard Webhooks way (``webhook-signature``), with the
attempt's time in ``webhook-timestamp`` so a receiver can refuse replays (docs/results.md).

A receiver that fails is retried with exponential backoff; after ``max_attempts`` failures (or
at once for an answer that cannot succeed, such as HTTP 400) the result is moved to the
dead-letter stream with the reason (``spotline dead list``), so one bad receiver never stalls
the sink forever and nothing disappears silently. ``spotline dead retry`` puts it back on the
results stream (where every sink group sees it once more).

Limits: the results stream is capped (``results_maxlen``, ~10,000 by default); a sink that stays
down while more results than that are published misses the oldest. The ``spotline_sink_lag``
gauge shows how far behind a sink is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from redis import RedisError

from spotline.common.codec import decode
from spotline.common.deadletters import dead_letter_shared
from spotline.common.envelope import Result
from spotline.common.errors import DecodeError, SpotlineError
from spotline.common.metrics import add_process_series
from spotline.common.transport import Entry, Transport

log = logging.getLogger(__name__)

FRAME_HEADER = "X-Spotline-Frame"
# Standard Webhooks (https://www.standardwebhooks.com): the message id (the frame id: the same
# on every retry), the attempt's unix time in seconds, and "v1,<base64 HMAC-SHA256 of
# '{id}.{timestamp}.{body}'>" per secret, space-separated (several while a secret rotates).
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
DEFAULT_TOPIC = "spotline/{source_id}/results"
MAX_TOPIC_BYTES = 65535  # MQTT: a topic name is a UTF-8 string of at most this many bytes
LAG_EVERY_S = 2.0


class DeliveryError(SpotlineError):
    """A receiver did not take a result. ``permanent``: retrying cannot help (HTTP 4xx)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Target(Protocol):
    """Where a sink delivers: raises DeliveryError when the receiver did not take it."""

    kind: str

    def send(self, result: Result, payload: bytes) -> None: ...

    def close(self) -> None: ...


def result_payload(result: Result) -> bytes:
    """The JSON body every sink sends: ``Result.as_json()`` (boxes as [left, top, w, h])."""
    return json.dumps(result.as_json(), separators=(",", ":"), allow_nan=False).encode()


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` of ``{id}.{timestamp}.{body}``
    under each key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
                    for k in keys)


def parse_secrets(text: str, where: str) -> list[bytes]:
    """The keys of a secret file: one ``whsec_<base64>`` a line or space-separated (several
    while rotating; ``#`` comments); SpotlineError naming the problem."""
    keys = []
    for token in " ".join(line.split("#", 1)[0] for line in text.splitlines()).split():
        if not token.startswith(SECRET_PREFIX):
            raise SpotlineError(f"{where}: a webhook secret is whsec_<base64> (Standard "
                                f"Webhooks), got one starting {token[:6]!r}")
        try:
            key = base64.b64decode(token[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise SpotlineError(f"{where}: the part after whsec_ is not base64") from None
        if len(key) < 16:
            raise SpotlineError(f"{where}: a webhook secret needs at least 16 bytes "
                                f"(24 base64 characters), got {len(key)}")
        keys.append(key)
    if not keys:
        raise SpotlineError(f"{where} holds no secret")
    return keys


class SecretFile:
    """The signing keys of a secret file, read again whenever its modification time or size
    changes (checked before each delivery): a secret rotates without a restart. A file that
    becomes unreadable or invalid keeps the keys last read, and says so in the log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys = parse_secrets(self.path.read_text(), str(self.path))
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def keys(self) -> list[bytes]:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            try:
                self._keys = parse_secrets(self.path.read_text(), str(self.path))
                log.info("webhook secret file %s changed: signing with %d secret(s)",
                         self.path, len(self._keys))
            except (OSError, SpotlineError) as exc:
                log.error("webhook secret file unusable (%s); still signing with the "
                          "previous secret(s)", exc)
            self._stamp = stamp
        return self._keys


# --- targets --------------------------------------------------------------------------------
class WebhookTarget:
    """JSON POST to a URL, signed the Standard Webhooks way when secrets are given: a
    ``SecretFile`` (re-read when it changes) or fixed ``whsec_`` keys."""

    kind = "webhook"

    def __init__(self, url: str, secret: SecretFile | list[bytes] | None = None,
                 timeout_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        import httpx

        if urlsplit(url).scheme not in ("http", "https"):
            raise SpotlineError(f"webhook URL must be http:// or https://, got {url!r}")
        self.url = url
        self.secret = secret
        self.clock = clock
        self._http = httpx.Client(timeout=timeout_s)
        self._httpx = httpx

    def _keys(self) -> list[bytes]:
        if isinstance(self.secret, SecretFile):
            return self.secret.keys()
        return list(self.secret or [])

    def send(self, result: Result, payload: bytes) -> None:
        headers = {"Content-Type": "application/json", FRAME_HEADER: result.frame_id,
                   "User-Agent": "spotline-sink"}
        keys = self._keys()
        if keys:
            now = int(self.clock())
            headers.update({ID_HEADER: result.frame_id, TIMESTAMP_HEADER: str(now),
                            SIGNATURE_HEADER: sign(keys, result.frame_id, now, payload)})
        try:
            resp = self._http.post(self.url, content=payload, headers=headers)
        except self._httpx.HTTPError as exc:  # timeouts, refused, reset
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        if resp.is_success:
            return
        # 408 (timeout) and 429 (slow down) are worth retrying; any other 4xx is not.
        permanent = 400 <= resp.status_code < 500 and resp.status_code not in (408, 429)
        raise DeliveryError(f"HTTP {resp.status_code}: {resp.text[:200]}", permanent=permanent)

    def close(self) -> None:
        self._http.close()


def mqtt_topic(template: str, source_id: str) -> str:
    """The topic a source's results go to; DeliveryError (permanent) when the source id would
    make it invalid: a wildcard (``+``, ``#``), NUL or another control character, or text
    that is not UTF-8. Such a result is dead-lettered, never published on a
    topic it did not name (a wildcard there is refused by the broker and by paho)."""
    bad = sorted({c for c in source_id if c in "+#" or ord(c) < 32 or 0x7F <= ord(c) < 0xA0})
    if not source_id or bad:
        raise DeliveryError(f"source id {source_id!r} cannot be part of an MQTT topic "
                            f"({'empty' if not source_id else 'holds ' + repr(''.join(bad))})",
                            permanent=True)
    topic = template.format(source_id=source_id)
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise DeliveryError(f"source id {source_id!r}: the MQTT topic is not UTF-8",
                            permanent=True) from None
    if size > MAX_TOPIC_BYTES:
        raise DeliveryError(f"MQTT topic of {size} bytes: at most {MAX_TOPIC_BYTES}",
                            permanent=True)
    return topic


class MqttTarget:
    """Publish to an MQTT broker at QoS 1, one topic per source (``{source_id}`` in the
    template); a result counts as delivered when the broker's PUBACK arrives. A source id
    that cannot make a valid topic dead-letters its result (``mqtt_topic``)."""

    kind = "mqtt"

    def __init__(self, url: str, topic: str = DEFAULT_TOPIC, client_id: str = "",
                 timeout_s: float = 10.0) -> None:
        import paho.mqtt.client as mqtt

        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise SpotlineError(f"MQTT URL must be mqtt://[user:password@]host[:port], "
                                f"got {url!r}")
        try:
            topic.format(source_id="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise SpotlineError(f"topic template {topic!r}: only {{source_id}} may be used "
                                f"({exc})") from None
        try:
            mqtt_topic(topic, "x")
        except DeliveryError as exc:
            raise SpotlineError(f"topic template {topic!r}: {exc}") from None
        if any(c in topic for c in "+#\0"):
            raise SpotlineError(f"topic template {topic!r}: no wildcards (+ #) or NUL in a "
                                "topic one publishes to")
        self.topic = topic
        self.timeout_s = timeout_s
        self._connected = threading.Event()
        self._mqtt = mqtt
        client_id = client_id or f"spotline-sink-{socket.gethostname()}"
        c = self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if parts.username:
            c.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
        if parts.scheme == "mqtts":
            c.tls_set()
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = lambda *a: self._on_connect(*a)
        c.on_disconnect = lambda *_a: self._connected.clear()
        c.connect_async(parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883))
        c.loop_start()  # network thread: connects, reconnects with backoff, resends in flight

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any = None) -> None:
        if not reason.is_failure:
            self._connected.set()
        else:
            log.warning("mqtt broker refused the connection: %s", reason)

    def send(self, result: Result, payload: bytes) -> None:
        if not self._connected.wait(self.timeout_s):
            raise DeliveryError(f"not connected to the MQTT broker after {self.timeout_s:.0f}s")
        topic = mqtt_topic(self.topic, result.source_id)
        try:
            info = self._client.publish(topic, payload, qos=1)
        except ValueError as exc:  # paho's own checks (topic, payload size): cannot succeed
            raise DeliveryError(f"publish to {topic!r}: {exc}", permanent=True) from None
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise DeliveryError(f"publish to {topic}: {self._mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise DeliveryError(f"publish to {topic}: {exc}") from None
        if not info.is_published():
            raise DeliveryError(f"no PUBACK for {topic} within {self.timeout_s:.0f}s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# --- metrics --------------------------------------------------------------------------------
class SinkMetrics:
    """delivered, retried, failed (dead-lettered) and lag of each sink, on a registry of its own
    (served on ``--metrics-port``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        add_process_series(r)  # process_* and spotline_build_info, as every process has
        self.delivered = Counter("spotline_sink_delivered", "Results a receiver took",
                                 ["sink"], registry=r)
        self.retried = Counter("spotline_sink_retried", "Delivery attempts that failed and were "
                               "retried", ["sink"], registry=r)
        self.failed = Counter("spotline_sink_failed", "Results dead-lettered after the last "
                              "failed attempt", ["sink"], registry=r)
        self.lag = Gauge("spotline_sink_lag", "Results published but not yet delivered "
                         "(unread + in flight)", ["sink"], registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_address[1])


# --- the consumer loop ----------------------------------------------------------------------
@dataclass(frozen=True)
class SinkOptions:
    """How a sink reads and retries."""

    name: str  # consumer group: sink-<name>
    consumer: str = ""  # stable per host by default: a restart resumes its own pending entries
    start: str = "new"  # where a new group starts: "new" results, or "all" the stream holds
    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    batch: int = 32
    block_ms: int = 1000

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "{}: "):
            raise SpotlineError(f"sink name must be non-empty without braces, colons or "
                                f"spaces: {self.name!r}")
        if self.start not in ("new", "all"):
            raise SpotlineError(f"start must be 'new' or 'all', got {self.start!r}")
        if self.max_attempts < 1 or self.backoff_s < 0 or self.batch < 1:
            raise SpotlineError("max_attempts and batch must be >= 1, backoff_s >= 0")

    @property
    def group(self) -> str:
        return f"sink-{self.name}"

    @property
    def group_start(self) -> str:
        """Where a new group (or one recreated after a Redis restart) starts reading."""
        return "$" if self.start == "new" else "0"


@dataclass
class SinkCounts:
    delivered: int = 0
    retried: int = 0
    failed: int = 0


class Sink:
    """Runs one target against the results stream until stopped."""

    def __init__(self, transport: Transport, target: Target, opts: SinkOptions,
                 metrics: SinkMetrics | None = None) -> None:
        self.t = transport
        self.target = target
        self.opts = opts
        self.metrics = metrics or SinkMetrics()
        self.consumer = opts.consumer or f"{opts.name}-{socket.gethostname()}"
        self.counts = SinkCounts()
        self._stop = threading.Event()
        self._last_lag = 0.0
        self._last_claim = 0.0

    # --- lifecycle -----------------------------------------------------------------------
    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Finish the result in hand, then return from run()."""
        if not self._stop.is_set():
            log.info("sink=%s stopping (signal %s)", self.opts.group, signum)
        self._stop.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ensure_group(self) -> None:
        if self.t.create_group(self.t.keys.results, self.opts.group, self.opts.group_start):
            log.info("sink=%s created on %s (from %s results)", self.opts.group,
                     self.t.keys.results, self.opts.start)

    def run(self, until: Callable[[], bool] | None = None) -> SinkCounts:
        """Deliver until stopped (or until ``until()`` holds, checked between batches)."""
        self.ensure_group()
        log.info("sink=%s consumer=%s delivering to %s", self.opts.group, self.consumer,
                 self.target.kind)
        own_pending = True  # first re-send what this consumer read before a crash
        try:
            while not self.stopping and not (until and until()):
                self._refresh_lag()
                if own_pending:
                    rows = self._read(pending=True)
                    own_pending = bool(rows)
                else:
                    rows = self._claim() or self._read()
                for entry in rows:
                    if self.stopping:
                        break
                    self._handle(entry)
        finally:
            self._refresh_lag(force=True)
            self.target.close()
        log.info("sink=%s done: %s", self.opts.group, self.counts)
        return self.counts

    # --- reading -------------------------------------------------------------------------
    def _read(self, pending: bool = False) -> list[Entry]:
        """New results, or (``pending``) those this consumer read before and never acked."""
        return self.t.read_group(self.t.keys.results, self.opts.group, self.consumer,
                                 self.opts.batch, self.opts.block_ms, pending=pending,
                                 start=self.opts.group_start)

    def _claim(self) -> list[Entry]:
        """Entries another consumer of this group read and left pending (it died)."""
        now = time.monotonic()
        if now - self._last_claim < self.t.settings.visibility_timeout_ms / 4000:
            return []
        self._last_claim = now
        return self.t.reclaim_group(self.t.keys.results, self.opts.group, self.consumer,
                                    self.opts.batch, start=self.opts.group_start)

    def _refresh_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = now
        try:
            self.metrics.lag.labels(self.opts.name).set(self.lag())
        except (SpotlineError, RedisError) as exc:
            log.debug("sink lag not refreshed: %s", exc)

    def lag(self) -> int:
        """Results of the stream this sink has not delivered yet: unread plus in flight."""
        g = self.t.group_info(self.t.keys.results, self.opts.group)
        if g is None:
            return 0
        # lag is None before Redis 7, or after a trim it cannot count across
        return int(g.get("lag") or 0) + int(g["pending"])

    # --- delivering ----------------------------------------------------------------------
    def _handle(self, entry: Entry) -> None:
        if not entry.fields:  # trimmed from the stream while pending: nothing left to send
            log.warning("sink=%s entry=%s was trimmed before delivery", self.opts.group,
                        entry.id)
            self._ack(entry.id)
            return
        try:
            result = decode(entry.payload)
        except DecodeError as exc:
            self._dead(entry, f"undecodable result: {exc}", 0)
            return
        if not isinstance(result, Result):
            self._dead(entry, f"a {type(result).__name__} is not a result", 0)
            return
        try:
            payload = result_payload(result)
        except (ValueError, TypeError) as exc:  # a NaN or infinity where JSON has none
            self._dead(entry, f"result not representable as JSON: {exc}", 0)
            return
        attempts, error = self._deliver(entry.id, result, payload)
        if error is None:
            self._ack(entry.id)
            self.counts.delivered += 1
            self.metrics.delivered.labels(self.opts.name).inc()
        elif attempts:
            self._dead(entry, f"{self.target.kind} failed after {attempts} attempt(s): "
                       f"{error}", attempts)
        # else: stopped between retries; left pending, re-sent when the sink starts again

    def _deliver(self, entry_id: str, result: Result,
                 payload: bytes) -> tuple[int, DeliveryError | None]:
        """Send with retries and exponential backoff: (attempts made, the last error or None).
        Attempts 0 with an error: stopped before giving up."""
        delay = self.opts.backoff_s
        for attempt in range(1, self.opts.max_attempts + 1):
            try:
                self.target.send(result, payload)
                return attempt, None
            except DeliveryError as exc:
                if exc.permanent or attempt == self.opts.max_attempts:
                    return attempt, exc
                if self.stopping:
                    return 0, exc
                self.counts.retried += 1
                self.metrics.retried.labels(self.opts.name).inc()
                log.warning("sink=%s frame=%s entry=%s attempt %d failed (%s); retrying in "
                            "%.2fs", self.opts.group, result.frame_id, entry_id, attempt, exc,
                            delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.opts.backoff_max_s)
        raise AssertionError("unreachable")

    def _ack(self, entry_id: str) -> None:
        # XACK only, never XDEL: the results stream is shared with other groups and readers.
        self.t.ack(self.t.keys.results, self.opts.group, [entry_id])

    def _dead(self, entry: Entry, reason: str, attempts: int) -> None:
        """Move a result to the dead-letter stream with its reason and ack it, atomically."""
        log.error("sink=%s frame=%s entry=%s dead-lettered: %s", self.opts.group,
                  entry.frame_id or "", entry.id, reason)
        dead_letter_shared(self.t, self.opts.group, entry, reason, attempts)
        self.counts.failed += 1
        self.metrics.failed.labels(self.opts.name).inc()
