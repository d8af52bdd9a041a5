"""Producers: every kind of source through publish_source into the detect stream (real Redis),
both backpressure policies, and `spotline publish` / `spotline results` over a real pipeline."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from spotline.common.codec import decode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope
from spotline.common.metrics import Metrics
from spotline.common.settings import Settings, load_settings, settings_env
from spotline.common.transport import Transport
from spotline.producer.client import Client
from spotline.producer.publisher import (
    PublishStats,
    SourceFailed,
    default_policy,
    publish_source,
)
from spotline.producer.sources import Reconnect, open_source
from tests.faultlib import wait_for

CAPS = ("grey missile", "yellow helicopter")


# --- helpers -----------------------------------------------------------------------------------
def jpeg(w: int = 48, h: int = 32, value: int = 100) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 20 + i * 30, np.uint8))
    writer.release()
    return path


def write_folder(path: Path, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"img_{i:02d}.jpg").write_bytes(jpeg(40 + i, 30, 10 * i))
    return path


def write_til(root: Path, n: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"image_{i}.jpg"
        (root / "images" / name).write_bytes(jpeg(64, 48, 30 * i))
        lines.append(json.dumps({"image": name, "annotations": [
            {"caption": f"grey missile {i}", "bbox": [1, 2, 10, 12]},
            {"caption": "yellow helicopter", "bbox": [20, 10, 8, 8]}]}))
    (root / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return root


def stream_envelopes(t: Transport) -> list[Envelope]:
    rows = t.r.xrange(t.keys.inbox("detect"))
    out = [decode(fields[b"d"]) for _id, fields in rows]
    assert all(isinstance(e, Envelope) for e in out)
    return out  # type: ignore[return-value]


def drain(t: Transport, max_entries: int = 100) -> list[Envelope]:
    """Consume entries as a detect worker would (read in the group, then ack and delete)."""
    entries = t.read("detect", "tester", max_entries, block_ms=50, max_wait_ms=0)
    t.commit("detect", [], [e.id for e in entries])
    return [decode(e.payload) for e in entries]  # type: ignore[misc]


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def client(redis_server: EmbeddedRedis, settings: Settings) -> Iterator[Client]:
    c = Client.connect(redis_server.url, settings)
    yield c
    c.close()


# --- each kind of source -----------------------------------------------------------------------
def test_image_goes_into_the_detect_stream(tmp_path: Path, client: Client, settings: Settings,
                                           transport: Transport) -> None:
    path = tmp_path / "frame.jpg"
    path.write_bytes(jpeg(48, 32))
    metrics = Metrics()
    before = time.time()
    stats = publish_source(open_source(str(path), CAPS, source_id="cam-a"), client, settings,
                           progress=False, metrics=metrics)
    assert (stats.published, stats.dropped, stats.errors) == (1, 0, 0)
    [env] = stream_envelopes(transport)
    assert env.frame_id == stats.frame_ids[0]
    assert env.image == path.read_bytes() and env.captions == CAPS
    assert env.source_id == "cam-a" and env.image_size == (48, 32)
    assert before <= env.capture_time <= time.time()
    assert counter(metrics, "spotline_frames_published_total", source="cam-a",
                   via="client") == 1


def test_folder_rejects_bad_frames_by_name(tmp_path: Path, client: Client, settings: Settings,
                                           transport: Transport,
                                           caplog: pytest.LogCaptureFixture) -> None:
    folder = write_folder(tmp_path / "frames", 3)
    (folder / "img_01b.jpg").write_bytes(b"not a jpeg at all")
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="spotline.producer.publisher"):
        stats = publish_source(open_source(str(folder), CAPS), client, settings,
                               progress=False, metrics=metrics)
    assert (stats.published, stats.errors, stats.dropped) == (3, 1, 0)
    assert stats.rejected[0][0] == "img_01b.jpg" and "decoded" in stats.rejected[0][1]
    assert "img_01b.jpg rejected" in caplog.text
    envs = stream_envelopes(transport)
    assert [e.image_size for e in envs] == [(40, 30), (41, 30), (42, 30)]
    assert counter(metrics, "spotline_frames_dropped_total", source="frames",
                   reason="rejected") == 1


def test_video_frames_as_jpeg(tmp_path: Path, client: Client, settings: Settings,
                              transport: Transport) -> None:
    video = write_video(tmp_path / "clip.avi", 5)
    src = open_source(str(video), CAPS)
    assert not src.live and default_policy(src, settings) == "block"
    stats = publish_source(src, client, settings, progress=False)
    assert stats.published == 5 and stats.total == 5
    envs = stream_envelopes(transport)
    assert [e.source_id for e in envs] == ["clip.avi"] * 5
    first = cv2.imdecode(np.frombuffer(envs[0].image, np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == (48, 64, 3) and envs[0].image_size == (64, 48)


def test_live_file_stream_bounded(tmp_path: Path, client: Client, settings: Settings,
                                  transport: Transport) -> None:
    video = write_video(tmp_path / "live.avi", 3)
    src = open_source(video.as_uri(), CAPS, reconnect=Reconnect(3, 0.0, 0.0))
    assert src.live and default_policy(src, settings) == "drop-oldest"
    # the file ends every 3 frames and is reopened: a feed that never ends; stop after 7
    stats = publish_source(src, client, settings, progress=False, max_frames=7)
    assert (stats.published, stats.read, stats.dropped) == (7, 7, 0)
    assert len(stream_envelopes(transport)) == 7


def test_lost_live_feed_is_a_clear_failure(tmp_path: Path, client: Client,
                                           settings: Settings) -> None:
    video = write_video(tmp_path / "feed.avi", 3)

    def vanish(_delay: float) -> None:  # the feed goes away for good while reconnecting
        video.unlink(missing_ok=True)

    src = open_source(video.as_uri(), CAPS, reconnect=Reconnect(2, 0.0, 0.0, sleep=vanish))
    with pytest.raises(SourceFailed, match=r"lost: no frames after 2 reconnect attempts") as exc:
        publish_source(src, client, settings, progress=False)
    assert exc.value.stats.published == 3
    assert "3 published" in str(exc.value)


def test_til_dataset_brings_its_captions(tmp_path: Path, client: Client, settings: Settings,
                                         transport: Transport) -> None:
    root = write_til(tmp_path / "til", 2)
    stats = publish_source(open_source(str(root), ()), client, settings, progress=False)
    assert stats.published == 2
    envs = stream_envelopes(transport)
    assert [e.captions for e in envs] == [("grey missile 0", "yellow helicopter"),
                                          ("grey missile 1", "yellow helicopter")]
    assert {e.source_id for e in envs} == {"til"}


# --- backpressure ------------------------------------------------------------------------------
def test_block_waits_for_the_backlog_then_loses_nothing(tmp_path: Path, redis_server:
                                                        EmbeddedRedis, settings: Settings,
                                                        transport: Transport) -> None:
    s = settings.replace(high_water=2)
    folder = write_folder(tmp_path / "recorded", 5)
    client = Client.connect(redis_server.url, s)
    out: list[PublishStats] = []
    thread = threading.Thread(target=lambda: out.append(publish_source(
        open_source(str(folder), CAPS), client, s, policy="block", progress=False)))
    thread.start()
    stream = transport.keys.inbox("detect")
    wait_for(lambda: transport.r.xlen(stream) == 2, what="two frames in the inbox")
    assert thread.is_alive()  # blocked at high water, nothing dropped
    seen: list[Envelope] = []
    while len(seen) < 5:  # a consumer catches up; the producer goes on each time
        seen += drain(transport)
        assert len(seen) == 5 or thread.is_alive() or transport.r.xlen(stream)
    thread.join(timeout=30)
    assert not thread.is_alive()
    [stats] = out
    assert (stats.published, stats.dropped, stats.errors) == (5, 0, 0)
    assert stats.blocked_s > 0
    assert [e.image_size[0] for e in seen] == [40, 41, 42, 43, 44]  # in order, none lost
    client.close()


def test_drop_oldest_keeps_the_newest_frame(tmp_path: Path, redis_server: EmbeddedRedis,
                                            settings: Settings, transport: Transport) -> None:
    s = settings.replace(high_water=2)
    folder = write_folder(tmp_path / "feed", 6)
    client = Client.connect(redis_server.url, s)
    metrics = Metrics()
    drained: list[Envelope] = []

    def consumer_catches_up(stats: PublishStats) -> None:
        if stats.read == 4:  # frames 0, 1 sent; 2 dropped for 3, which is held
            drained.extend(drain(transport))

    stats = publish_source(open_source(str(folder), CAPS, source_id="cam"), client, s,
                           policy="drop-oldest", progress=False, metrics=metrics,
                           on_progress=consumer_catches_up)
    assert (stats.published, stats.dropped) == (4, 2)
    assert [e.image_size[0] for e in drained] == [40, 41]
    # 3 was still held when 4 arrived (dropped); 4 went out as the backlog was low again
    assert [e.image_size[0] for e in stream_envelopes(transport)] == [44, 45]
    assert counter(metrics, "spotline_frames_dropped_total", source="cam",
                   reason="backpressure") == 2
    client.close()


def test_drop_oldest_with_no_consumer_drops_and_counts(tmp_path: Path,
                                                       redis_server: EmbeddedRedis,
                                                       settings: Settings,
                                                       transport: Transport,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    s = settings.replace(high_water=3)
    video = write_video(tmp_path / "live.avi", 4)
    src = open_source(video.as_uri(), CAPS, source_id="drone", reconnect=Reconnect(3, 0.0, 0.0))
    client = Client.connect(redis_server.url, s)
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="spotline.producer.publisher"):
        stats = publish_source(src, client, s, progress=False, metrics=metrics, max_frames=10)
    assert (stats.published, stats.dropped) == (3, 7)
    assert transport.backlog("detect") == 3
    assert counter(metrics, "spotline_frames_dropped_total", source="drone",
                   reason="backpressure") == 7
    assert "policy drop-oldest" in caplog.text
    client.close()


# --- the CLI over a real pipeline --------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(redis_server: EmbeddedRedis, data_dir: Path) -> Iterator[tuple[Settings, str]]:
    from spotline.pipeline.supervisor import LocalPipeline

    s = load_settings(env={}, namespace=f"pub{uuid.uuid4().hex[:8]}", data_dir=str(data_dir),
                      redis_url=redis_server.url).replace(imgsz=320, warmup=0, tta=False)
    with LocalPipeline(s, ready_timeout=300) as url:
        yield s, url


def run_cli(s: Settings, *args: str) -> str:
    from spotline.cli import cli
    env = {**settings_env(s), "SPOTLINE_REDIS_URL": s.redis_url}
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_publish_wait_and_results(tmp_path: Path, pipeline: tuple[Settings, str]) -> None:
    s, _url = pipeline
    folder = write_folder(tmp_path / "shots", 2)
    out = run_cli(s, "publish", str(folder), "-c", "grey missile", "-c", "yellow helicopter",
                  "--source-id", "shots", "--wait", "--timeout", "120", "--no-progress",
                  "--jsonl", str(tmp_path / "r.jsonl"), "--annotate", str(tmp_path / "ann"),
                  "--manifest", str(tmp_path / "m.jsonl"))
    assert "2 published, 0 dropped (backpressure), 0 rejected" in out
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["img_00.jpg", "img_01.jpg"]
    for row in rows:
        assert row["error"] is None and row["source_id"] == "shots"
        assert [r["caption"] for r in row["results"]] == ["grey missile", "yellow helicopter"]
        assert all(len(r["bbox"]) == 4 for r in row["results"])
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == [
        "shots_img_00.jpg", "shots_img_01.jpg"]

    # the same results, replayed from the stream, as JSONL on stdout
    replay = run_cli(s, "results", "--source", "shots", "--jsonl", "-")
    assert [json.loads(line)["frame_id"] for line in replay.splitlines()] == [
        r["frame_id"] for r in rows]
    followed = run_cli(s, "results", "--follow", "--from", "0", "--count", "2", "--source",
                       "shots")
    assert all(r["frame_id"] in followed for r in rows)
    # annotated later from the manifest of image files
    run_cli(s, "results", "--source", "shots", "--annotate", str(tmp_path / "later"),
            "--manifest", str(tmp_path / "m.jsonl"))
    assert len(list((tmp_path / "later").iterdir())) == 2


def test_eval_through_the_running_pipeline(tmp_path: Path,
                                          pipeline: tuple[Settings, str]) -> None:
    s, _url = pipeline
    root = write_til(tmp_path / "til", 3)
    out = run_cli(s, "eval", str(root), "--out", str(tmp_path / "ev"), "--batch-size", "3",
                  "--timeout", "120", "--no-progress")
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["n_images"] == 3 and report["n_captions"] == 6 and report["errors"] == []
    assert 0.0 <= report["accuracy"] <= 1.0 and "speed score" in out
    assert (tmp_path / "ev" / "eval.png").is_file()


def test_publish_missing_source_is_a_clear_error(tmp_path: Path, redis_server: EmbeddedRedis,
                                                 settings: Settings) -> None:
    from spotline.cli import cli
    env = {**settings_env(settings), "SPOTLINE_REDIS_URL": redis_server.url}
    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "nope.mp4"), "-c", "x"],
                                env=env)
    assert result.exit_code == 1
    assert f"no such file or folder: {tmp_path / 'nope.mp4'}" in result.output
