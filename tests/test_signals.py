"""Signals against real processes: `spotline up` stops the same graceful way on SIGTERM and
SIGINT (to it alone, or to its whole process group as a terminal's Ctrl-C), exits 0, restarts
nothing and leaves no process behind; children never outlive a SIGKILLed parent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings, load_settings
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import pipeline_stages
from tests.conftest import ROOT, child_env
from tests.faultlib import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="parent-death signals are Linux's")
GRACE_S = 30  # Supervisor.stop waits 20 s for workers before killing them


class Up:
    """A real `spotline up` in its own process group (so signalling the group spares pytest)."""

    def __init__(self, settings: Settings, tmp: Path, persist: bool = False) -> None:
        self.settings = settings
        self.log = tmp / "up.log"
        env = child_env(settings, "")
        env.pop("SPOTLINE_REDIS_URL")  # embedded Redis: `up` starts and stops its own
        args = ["--persist"] if persist else []
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spotline", "up", *args], env=env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        up_file = Path(settings.data_dir) / "up.json"
        wait_for(lambda: up_file.exists() or self.proc.poll() is not None, 60, "up.json")
        assert self.proc.poll() is None, self.text()
        self.url = json.loads(up_file.read_text())["url"]
        t = Transport(settings, url=self.url)
        try:
            for stage in pipeline_stages(settings):  # every worker in its loop, model loaded
                wait_for(lambda st=stage: t.workers_alive(st) >= 1 or self.proc.poll() is not None,
                         300, f"{stage} worker ready", every=0.2)
        finally:
            t.close()
        assert self.proc.poll() is None, self.text()
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in self.children)
        assert "redis-server" in names and names.count("spotline worker") == len(
            pipeline_stages(settings)), names

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def left(self) -> list[str]:
        out = []
        for c in self.children:
            try:
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{c.pid} {' '.join(c.cmdline())}")
            except psutil.NoSuchProcess:
                pass
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for c in self.children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def up(data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """`up` over the session's data dir (its tiny models are written once for all tests);
    ``--persist`` when the test's ``persist`` parameter says so."""
    callspec = getattr(request.node, "callspec", None)
    persist = bool(callspec.params.get("persist")) if callspec else False
    s = load_settings(env={}, namespace=f"sig{uuid.uuid4().hex[:8]}", data_dir=str(data_dir),
                      upscale=False)
    proc = Up(s, tmp_path, persist=persist)
    yield proc
    proc.kill()
    shutil.rmtree(Path(data_dir) / "redis", ignore_errors=True)  # no AOF for the next `up`


@pytest.mark.parametrize("sig, to_group, persist", [
    (signal.SIGTERM, False, True),  # `up --persist`: and what Redis held is saved
    (signal.SIGINT, False, False),
    (signal.SIGINT, True, False),  # a terminal's Ctrl-C: up and every worker get it at once
    (signal.SIGTERM, True, False),  # `kill -TERM -PGID`, what some supervisors do
])
def test_up_stops_gracefully_on_sigterm_and_sigint(up: Up, sig: signal.Signals,
                                                   to_group: bool, persist: bool) -> None:
    if persist:  # written just before the signal: `up` must shut Redis down with it saved
        probe = redis.Redis.from_url(up.url)
        probe.set("sig-probe", "written before the signal")
        probe.close()
    if to_group:
        os.killpg(up.proc.pid, sig)
    else:
        up.proc.send_signal(sig)
    try:
        code = up.proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`up` still running {GRACE_S}s after {sig.name}:\n{up.text()[-3000:]}")
    text = up.text()
    assert code == 0, text[-3000:]
    assert "restarted" not in text and "not restarting" not in text, text[-3000:]
    assert f"{sig.name}: stopping" in text and "spotline up: stopped" in text
    wait_for(lambda: not up.left(), 10, f"children gone: {up.left()}")
    assert not (Path(up.settings.data_dir) / "up.json").exists()
    workers_done = text.count("done: Counts(")
    assert workers_done == len(pipeline_stages(up.settings)), "every worker left its loop"
    if persist:
        server = EmbeddedRedis(Path(up.settings.data_dir) / "redis", persist=True).start()
        try:
            assert redis.Redis.from_url(server.url).get("sig-probe") == (
                b"written before the signal")
        finally:
            server.close()


def test_children_die_with_a_killed_up(up: Up) -> None:
    up.proc.kill()
    up.proc.wait()
    wait_for(lambda: not up.left(), 10, "every child of a SIGKILLed `up` gone")


def test_embedded_redis_dies_with_its_parent(tmp_path: Path) -> None:
    """The test fixtures' and `bench`'s redis-server: SIGKILL the process that started it."""
    script = ("import sys, time; from spotline.common.embedded import EmbeddedRedis; "
              "r = EmbeddedRedis().start(); print(r.proc.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        server = psutil.Process(pid)
        assert "redis-server" in server.name()
        parent.kill()
        parent.wait()
        wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 10,
                 "redis-server gone with its parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
