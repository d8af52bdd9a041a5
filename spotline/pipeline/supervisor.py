"""`spotline up`: Redis (embedded unless a URL is set) plus one supervised worker process per
stage. A child that dies is reported and restarted (with backoff if it keeps dying); one that
exits 0 was asked to stop and is not.

SIGTERM and SIGINT (alone, or to the whole process group as a terminal's Ctrl-C sends it) take
the same path: the workers finish their batch, the embedded Redis shuts down last (saving with
``--persist``), exit 0. Children never outlive a killed `up` (common/children.py): workers get
a SIGKILL when it dies, the embedded redis-server a SIGTERM (it saves and exits)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from spotline.common.children import die_with_parent
from spotline.common.embedded import EmbeddedRedis
from spotline.common.errors import ConfigError
from spotline.common.redact import redact_url
from spotline.common.settings import Settings, settings_env
from spotline.common.topology import ALL_STAGES, pipeline

log = logging.getLogger(__name__)

UP_FILE = "up.json"  # where a running `spotline up` tells other commands its Redis URL
SUPERVISE_EVERY_S = 0.5  # how often LocalPipeline looks for dead children
QUICK_DEATH_S = 5.0  # a child dying this soon after a start, 3+ times: restart with backoff


def pipeline_stages(settings: Settings) -> list[str]:
    """The stages a pipeline runs, in order (upscale only when it is on; detect, track and
    collect in track mode)."""
    return list(pipeline(settings))


@dataclass
class Child:
    """One supervised worker process."""

    stage: str
    index: int
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    metrics_port: int | None = None
    not_before: float = 0.0  # a child that keeps dying is restarted no sooner than this
    stopped: bool = False  # exited 0 (asked to stop): not restarted

    @property
    def name(self) -> str:
        return f"{self.stage}#{self.index}"

    def start(self) -> None:
        # SIGKILL when `up` dies: a worker still loading its model would take its time over
        # a SIGTERM; what it held is reclaimed by live workers after visibility_timeout_ms.
        self.proc = subprocess.Popen(self.args, env=self.env,
                                     preexec_fn=die_with_parent(signal.SIGKILL))
        self.started = time.monotonic()
        self.stopped = False


@dataclass
class Supervisor:
    """Starts, watches and stops the worker processes of one pipeline."""

    settings: Settings
    url: str
    workers: dict[str, int] = field(default_factory=dict)
    metrics: bool = False
    burst: bool = False
    children: list[Child] = field(default_factory=list)
    stopping: bool = False  # set by stop() (and a signal handler): nothing is restarted

    def start(self) -> Supervisor:
        env = {**os.environ, **settings_env(self.settings), "SPOTLINE_REDIS_URL": self.url}
        port = self.settings.metrics_port or 9100
        for stage in pipeline_stages(self.settings):
            for i in range(self.workers.get(stage, 1)):
                args = [sys.executable, "-m", "spotline", "worker", stage]
                child = Child(stage, i, args, env)
                if self.metrics:
                    child.metrics_port = port
                    args += ["--metrics-port", str(port)]
                    port += 1
                if self.burst:
                    args.append("--burst")
                self.children.append(child)
                child.start()
                log.info("started %s (pid %d)%s", child.name, child.proc.pid,  # type: ignore
                         f" metrics :{child.metrics_port}" if child.metrics_port else "")
        return self

    def check(self) -> list[str]:
        """Restart children that died (never blocks: one that keeps dying is restarted with
        a growing delay); returns what happened, one line each, also logged as warnings."""
        if self.stopping:
            return []
        events = [line for child in self.children if (line := self._check_child(child))]
        for line in events:
            log.warning(line)
        return events

    def _check_child(self, child: Child) -> str | None:
        code = child.proc.poll() if child.proc else None
        if child.proc is None or code is None or child.stopped or self.stopping:
            return None
        pid = child.proc.pid
        if code == 0:  # a worker exits 0 only when asked to (a signal, or --burst's empty inbox)
            child.stopped = True
            return None if self.burst else (f"worker {child.name} (pid {pid}) stopped cleanly "
                                            "(status 0, asked to by a signal); not restarting it")
        now = time.monotonic()
        if not child.not_before and now - child.started < QUICK_DEATH_S and child.restarts >= 3:
            backoff = min(30, 2 ** child.restarts)
            child.not_before = now + backoff
            return (f"worker {child.name} (pid {pid}) {describe_exit(code)} again, "
                    f"{now - child.started:.1f}s after its start: it keeps dying; next restart "
                    f"in {backoff}s")
        if now < child.not_before:
            return None
        child.not_before = 0.0
        child.restarts += 1
        child.start()
        return (f"worker {child.name} (pid {pid}) {describe_exit(code)}; restarted it as pid "
                f"{child.proc.pid} (restart #{child.restarts}). A live {child.stage} worker "
                f"takes over the entries it held after visibility_timeout_ms "
                f"({self.settings.visibility_timeout_ms} ms)")

    def alive(self) -> bool:
        return any(c.proc is not None and c.proc.poll() is None for c in self.children)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (they finish their batch), SIGKILL stragglers."""
        self.stopping = True
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing", child.name)
                child.proc.kill()
                child.proc.wait()


def describe_exit(code: int) -> str:
    """``-9`` → "was killed by SIGKILL", ``1`` → "exited with status 1"."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def parse_workers(specs: tuple[str, ...]) -> dict[str, int]:
    """``("score=2", "detect=1")`` → ``{"score": 2, "detect": 1}``."""
    out = {}
    for spec in specs:
        stage, _, n = spec.partition("=")
        if stage not in ALL_STAGES or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--workers takes STAGE=N with N >= 1, got {spec!r}")
        out[stage] = int(n)
    return out


def start_redis(settings: Settings, persist: bool = False) -> tuple[str, EmbeddedRedis | None]:
    """The configured Redis URL, or a fresh embedded redis-server (a random password: its URL
    goes to the workers in their environment, never on a command line)."""
    if settings.redis_url:
        return settings.redis_url, None
    server = EmbeddedRedis(Path(settings.data_dir) / "redis", persist=persist).start()
    return server.url, server


def write_up_file(settings: Settings, url: str) -> Path:
    """Where other commands find a running `spotline up`: its Redis URL, password included, so
    only the owner may read it (0600)."""
    path = Path(settings.data_dir) / UP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"url": url, "pid": os.getpid()}))
    return path


def running_url(settings: Settings) -> str | None:
    """The Redis URL to talk to: the configured one, else the one of a running `spotline up`."""
    if settings.redis_url:
        return settings.redis_url
    path = Path(settings.data_dir) / UP_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["url"])
    except (OSError, ValueError, KeyError):
        return None


StopSignals = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[bool]:
    """Route SIGTERM and SIGINT to ``handler`` inside the block, then restore the previous
    handlers. Signals can only be handled in the main thread: elsewhere this does nothing and
    yields False."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in StopSignals}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_up(settings: Settings, workers: dict[str, int], metrics: bool = False,
           persist: bool = False, echo: Callable[[str], None] = print) -> None:
    """`spotline up` until SIGTERM or SIGINT: returns once every child has stopped and the
    embedded Redis (if any) is shut down, so the command exits 0."""
    stop = threading.Event()
    received: list[int] = []
    sup = Supervisor(settings, "", workers=workers, metrics=metrics)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)  # no printing here: a handler may interrupt a print
        sup.stopping = True  # from now on nothing is restarted, whatever exits
        stop.set()

    server: EmbeddedRedis | None = None
    up_file: Path | None = None
    with on_stop_signals(on_signal):
        try:
            url, server = start_redis(settings, persist=persist)
            up_file = write_up_file(settings, url)
            sup.url = url
            if not stop.is_set():
                sup.start()
                echo(f"spotline up: redis {redact_url(url)}{' (embedded)' if server else ''}; "
                     f"stages {', '.join(c.name for c in sup.children)}. Ctrl-C to stop.")
            while not stop.wait(1.0):
                sup.check()
            echo(f"{signal.Signals(received[0]).name}: stopping (workers finish their batch)...")
        finally:
            sup.stop()
            if up_file is not None:
                up_file.unlink(missing_ok=True)
            if server is not None:
                server.close()
    echo("spotline up: stopped")


class LocalPipeline:
    """Redis (embedded unless configured) and supervised workers for the whole pipeline, as a
    context manager: `spotline demo`, `bench`, `eval` and the end-to-end tests use it.

        with LocalPipeline(settings) as url:
            client = Client.connect(url, settings)

    Once every worker is ready, a background thread restarts any that dies (like `spotline
    up`), unless ``supervise`` is False.
    """

    def __init__(self, settings: Settings, workers: dict[str, int] | None = None,
                 metrics: bool = False, ready_timeout: float = 600.0,
                 persist: bool = False, supervise: bool = True) -> None:
        self.settings = settings
        self.workers = workers or {}
        self.metrics = metrics
        self.ready_timeout = ready_timeout
        self.persist = persist
        self.supervise = supervise
        self.server: EmbeddedRedis | None = None
        self.supervisor: Supervisor | None = None
        self.url = ""
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> str:
        from spotline.stages.runtime import resolve_weights

        resolve_weights(self.settings)  # tiny models made once here, not by every child
        self._terminate_as_interrupt()
        self.url, self.server = start_redis(self.settings, persist=self.persist)
        self.supervisor = Supervisor(self.settings, self.url, workers=self.workers,
                                     metrics=self.metrics).start()
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        if self.supervise:
            self._done.clear()
            self._watcher = threading.Thread(target=self._watch, args=(self.supervisor,),
                                             daemon=True, name="spotline-supervisor")
            self._watcher.start()
        return self.url

    def _watch(self, supervisor: Supervisor) -> None:
        """Restart dead workers until the pipeline stops."""
        while not self._done.wait(SUPERVISE_EVERY_S):
            try:
                supervisor.check()
            except Exception:  # supervision must outlive a failed restart; say why
                log.exception("restarting a worker failed")

    def wait_ready(self) -> None:
        """Block until every worker has loaded its model and sent a heartbeat."""
        from spotline.common.transport import Transport

        assert self.supervisor is not None
        t = Transport(self.settings, url=self.url)
        deadline = time.monotonic() + self.ready_timeout
        try:
            for stage in pipeline_stages(self.settings):
                want = self.workers.get(stage, 1)
                while t.workers_alive(stage) < want:
                    dead = [c for c in self.supervisor.children
                            if c.stage == stage and c.proc and c.proc.poll() is not None]
                    if dead:
                        raise ConfigError(f"worker {dead[0].name} exited with "
                                          f"{dead[0].proc.returncode} while starting; "  # type: ignore
                                          "see its log above")
                    if time.monotonic() > deadline:
                        raise ConfigError(f"{stage} workers not ready after "
                                          f"{self.ready_timeout:.0f}s")
                    time.sleep(0.1)
        finally:
            t.close()

    def _terminate_as_interrupt(self) -> None:
        """In the main thread, a SIGTERM takes Ctrl-C's path (KeyboardInterrupt, then
        __exit__ stops every child and Redis) unless the program handles SIGTERM itself."""
        self._old_sigterm = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._watcher is not None:  # before stopping children: none is restarted any more
            self._watcher.join()
            self._watcher = None
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if getattr(self, "_old_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}")
