"""Stream control: feeds added and removed at run time through the CLI and the gateway's
/sources, run by a real supervisor against a real Redis: a folder read to its end, a video
read as a live stream (looping: the source reconnects), a stalled feed reported, a feed that
cannot be opened retried with backoff (credentials never shown), a removed feed stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.settings import Settings
from spotline.producer.client import Client
from spotline.producer.control import FeedSpec, Registry, Supervisor
from spotline.producer.gateway import create_app
from tests.conftest import ROOT, child_env
from tests.faultlib import small_frame, wait_for


@pytest.fixture
def client(redis_server: EmbeddedRedis, settings: Settings) -> Iterator[Client]:
    c = Client.connect(redis_server.url, settings)
    yield c
    c.close()


@pytest.fixture
def supervisor(settings: Settings, client: Client) -> Iterator[Supervisor]:
    sup = Supervisor(settings, client, poll_s=0.1, stall_s=30.0, base_backoff_s=0.05,
                     max_backoff_s=0.4, source_attempts=2)
    th = threading.Thread(target=sup.run, daemon=True)
    th.start()
    yield sup
    sup.stop()
    th.join(20)
    assert not th.is_alive()


def status(reg: Registry, sid: str) -> dict:
    st = reg.statuses().get(sid)
    return st.__dict__ if st else {}


def folder_of_frames(path: Path, n: int) -> Path:
    path.mkdir()
    for i in range(n):
        (path / f"f{i}.jpg").write_bytes(small_frame(i))
    return path


def video(path: Path, frames: int = 12) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    writer.release()
    return path


def cli(settings: Settings, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotline", "sources", *args], cwd=ROOT,
                          env=child_env(settings, url), capture_output=True, text=True,
                          timeout=60)


def test_cli_adds_a_folder_the_supervisor_reads_it_once_and_reports(
        redis_server: EmbeddedRedis, settings: Settings, client: Client,
        supervisor: Supervisor, tmp_path: Path) -> None:
    folder = folder_of_frames(tmp_path / "frames", 3)
    out = cli(settings, redis_server.url, "add", str(folder), "-c", "red box", "--id", "folder1")
    assert out.returncode == 0, out.stderr
    again = cli(settings, redis_server.url, "add", str(folder), "-c", "x", "--id", "folder1")
    assert again.returncode != 0 and "exists" in again.stderr
    reg = Registry(client.t)
    wait_for(lambda: status(reg, "folder1").get("state") == "finished", 30, "the folder read")
    st = status(reg, "folder1")
    assert st["published"] == 3 and st["last_frame_time"] and st["error"] is None
    assert client.t.r.xlen(client.keys.inbox("detect")) == 3
    listed = cli(settings, redis_server.url, "list", "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["source_id"] == "folder1" and row["status"]["state"] == "finished"
    assert row["captions"] == ["red box"]
    human = cli(settings, redis_server.url, "list").stdout
    assert "folder1  finished" in human and "published=3" in human
    gone = cli(settings, redis_server.url, "remove", "folder1")
    assert gone.returncode == 0
    wait_for(lambda: "folder1" not in supervisor.feeds, 10, "the feed let go")
    assert reg.listing() == [] and status(reg, "folder1") == {}
    assert client.t.r.xlen(client.keys.inbox("detect")) == 3  # read once, not again


def test_live_feed_runs_reconnects_and_stops_when_removed(
        client: Client, supervisor: Supervisor, tmp_path: Path) -> None:
    reg = Registry(client.t)
    clip = video(tmp_path / "clip.avi")
    reg.add(FeedSpec("cam1", str(clip), ("white van",), fps=50, live=True))
    # The 12-frame clip ends in well under a second; the live source reopens it (a reconnect)
    # and keeps going.
    wait_for(lambda: status(reg, "cam1").get("reconnects", 0) >= 1
             and status(reg, "cam1").get("published", 0) > 12, 30, "a reconnect")
    assert status(reg, "cam1")["state"] == "running"
    reg.remove("cam1")
    wait_for(lambda: "cam1" not in supervisor.feeds, 15, "the feed stopped")
    n = client.t.r.xlen(client.keys.inbox("detect"))
    assert status(reg, "cam1") == {}
    supervisor.step()  # one more round: nothing starts it again
    assert "cam1" not in supervisor.feeds
    assert client.t.r.xlen(client.keys.inbox("detect")) == n


def test_feed_without_frames_is_reported_stalled_then_running(
        client: Client, supervisor: Supervisor, tmp_path: Path) -> None:
    supervisor.stall_s = 0.3
    reg = Registry(client.t)
    # fps 0.5: one frame every 2 s, so between frames the feed is stalled for a while
    reg.add(FeedSpec("slow", str(video(tmp_path / "slow.avi")), ("x",), fps=0.5, live=True))
    wait_for(lambda: status(reg, "slow").get("published", 0) >= 1, 20, "a first frame")
    wait_for(lambda: status(reg, "slow").get("state") == "stalled", 10, "stalled")
    wait_for(lambda: status(reg, "slow").get("state") == "running", 10, "running again")


def test_a_feed_that_cannot_open_is_retried_with_backoff_without_showing_credentials(
        client: Client, supervisor: Supervisor) -> None:
    reg = Registry(client.t)
    url = f"rtsp://viewer:s3cret@127.0.0.1:{free_port()}/live"  # nothing listens there
    reg.add(FeedSpec("gone", url, ("x",)))
    wait_for(lambda: status(reg, "gone").get("restarts", 0) >= 3, 30, "retries")
    st = status(reg, "gone")
    assert st["state"] in ("reconnecting", "starting") and st["error"]
    assert "s3cret" not in json.dumps(reg.listing())
    assert "rtsp://127.0.0.1" in reg.listing()[0]["spec"]


def test_sources_over_the_gateway_http_api(settings: Settings, client: Client,
                                           tmp_path: Path) -> None:
    folder = folder_of_frames(tmp_path / "frames", 1)
    over_http = settings.replace(feed_roots=str(tmp_path))  # local paths need a root
    with TestClient(create_app(over_http, client), base_url="http://127.0.0.1") as http:
        body = {"source_id": "door/cam-2", "spec": str(folder), "captions": ["a person"]}
        created = http.post("/sources", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["source_id"] == "door/cam-2"
        assert http.post("/sources", json=body).status_code == 409
        bad = http.post("/sources", json={**body, "source_id": "x", "fps": -1})
        assert bad.status_code == 400 and "fps" in bad.text
        assert http.post("/sources", json={**body, "nope": 1}).status_code == 422
        (row,) = http.get("/sources").json()
        assert row["source_id"] == "door/cam-2" and row["status"] == {"state": "pending"}
        assert http.delete("/sources/door/cam-2").status_code == 204
        assert http.delete("/sources/door/cam-2").status_code == 404
        assert http.get("/sources").json() == []
