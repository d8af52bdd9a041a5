"""`spotline up`: Redis (embedded unless a URL is set) plus one supervised worker process per
stage. A child that dies is reported and restarted (with backoff if it keeps dying)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotline.common.embedded import EmbeddedRedis
from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, settings_env

log = logging.getLogger(__name__)

UP_FILE = "up.json"  # where a running `spotline up` tells other commands its Redis URL
SUPERVISE_EVERY_S = 0.5  # how often LocalPipeline looks for dead children
QUICK_DEATH_S = 5.0  # a child dying this soon after a start, 3+ times: restart with backoff


def pipeline_stages(settings: Settings) -> list[str]:
    """The stages a pipeline runs, in order (upscale only when it is on)."""
    return ["detect", *(["upscale"] if settings.upscale else []), "score", "collect"]


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

    @property
    def name(self) -> str:
        return f"{self.stage}#{self.index}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env)
        self.started = time.monotonic()


@dataclass
class Supervisor:
    """Starts, watches and stops the worker processes of one pipeline."""

    settings: Settings
    url: str
    workers: dict[str, int] = field(default_factory=dict)
    metrics: bool = False
    burst: bool = False
    children: list[Child] = field(default_factory=list)

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
        events = [line for child in self.children if (line := self._check_child(child))]
        for line in events:
            log.warning(line)
        return events

    def _check_child(self, child: Child) -> str | None:
        code = child.proc.poll() if child.proc else None
        if child.proc is None or code is None or (self.burst and code == 0):
            return None
        now = time.monotonic()
        pid = child.proc.pid
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
        if stage not in ("detect", "upscale", "score", "collect") or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--workers takes STAGE=N with N >= 1, got {spec!r}")
        out[stage] = int(n)
    return out


def start_redis(settings: Settings, persist: bool = False) -> tuple[str, EmbeddedRedis | None]:
    """The configured Redis URL, or a fresh embedded redis-server."""
    if settings.redis_url:
        return settings.redis_url, None
    server = EmbeddedRedis(Path(settings.data_dir) / "redis", persist=persist).start()
    return server.url, server


def write_up_file(settings: Settings, url: str) -> Path:
    path = Path(settings.data_dir) / UP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
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
