"""`spotline up`: Redis (embedded unless a URL is set) plus one supervised worker process per
stage. A child that dies is reported and restarted (with backoff if it keeps dying)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotline.common.embedded import EmbeddedRedis
from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, settings_env

log = logging.getLogger(__name__)

UP_FILE = "up.json"  # where a running `spotline up` tells other commands its Redis URL


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
        """Restart children that died; returns what happened, one line each."""
        events = []
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None:
                continue
            if self.burst and code == 0:
                continue
            if time.monotonic() - child.started < 5 and child.restarts >= 3:
                backoff = min(30, 2 ** child.restarts)
                events.append(f"{child.name} keeps dying (exit {code}); waiting {backoff}s")
                time.sleep(backoff)
            child.restarts += 1
            events.append(f"{child.name} (pid {child.proc.pid}) exited with {code}; "  # type: ignore
                          f"restarting (restart #{child.restarts})")
            child.start()
        for line in events:
            log.warning(line)
        return events

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
    """

    def __init__(self, settings: Settings, workers: dict[str, int] | None = None,
                 metrics: bool = False, ready_timeout: float = 600.0,
                 persist: bool = False) -> None:
        self.settings = settings
        self.workers = workers or {}
        self.metrics = metrics
        self.ready_timeout = ready_timeout
        self.persist = persist
        self.server: EmbeddedRedis | None = None
        self.supervisor: Supervisor | None = None
        self.url = ""

    def __enter__(self) -> str:
        from spotline.models import resolve_weights

        resolve_weights(self.settings)  # tiny models made once here, not by every child
        self.url, self.server = start_redis(self.settings, persist=self.persist)
        self.supervisor = Supervisor(self.settings, self.url, workers=self.workers,
                                     metrics=self.metrics).start()
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.url

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
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.server is not None:
            self.server.close()
            self.server = None
