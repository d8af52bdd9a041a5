"""Frame sources (image, folder, video, stream, camera, TIL dataset) and the frame limits."""

from __future__ import annotations

import itertools
import json
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.producer.sources import (
    DatasetSource,
    FolderSource,
    ImageSource,
    LiveSource,
    Pacer,
    Reconnect,
    SourceFrame,
    VideoSource,
    check_frame,
    classify,
    default_source_id,
    image_size,
    load_captions,
    open_source,
    redact,
    validate_frame,
)

CAPS = ("grey missile", "yellow helicopter")


def _jpeg(w: int = 32, h: int = 24, value: int = 128) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _png(w: int = 32, h: int = 24) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((h, w, 3), np.uint8))
    assert ok
    return buf.tobytes()


def _video(path: Path, frames: int = 6, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), i * 30, np.uint8))
    writer.release()
    return path


def _big_png(w: int, h: int) -> bytes:
    """A valid 1-bit grayscale PNG of w×h zeros, compressed row-chunk by row-chunk (small RAM)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = bytes(1 + (w + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(1)
    block = row * 1000
    parts = [comp.compress(block) for _ in range(h // 1000)]
    parts += [comp.compress(row * (h % 1000)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "til"
    (root / "images").mkdir(parents=True)
    rows = [
        {"image": "image_0.jpg", "annotations": [
            {"caption": "grey missile", "bbox": [1, 2, 10, 12]},
            {"caption": "red car", "bbox": [5, 5, 4, 4]}]},
        {"image": "image_1.jpg", "annotations": [
            {"caption": "yellow helicopter", "bbox": [0, 0, 8, 8]}]},
    ]
    for i, row in enumerate(rows):
        (root / "images" / row["image"]).write_bytes(_jpeg(value=40 * i))
    (root / "vlm.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return root


# --- kinds ---------------------------------------------------------------------------------

def test_image_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    src = open_source(str(path), CAPS)
    assert isinstance(src, ImageSource) and src.kind == "image" and not src.live
    assert src.source_id == "a.jpg" and src.total == 1
    before = time.time()
    frames = list(src)
    assert len(frames) == 1
    f = frames[0]
    assert isinstance(f, SourceFrame)
    assert f.image == path.read_bytes()  # bytes as the feed sent them
    assert f.captions == CAPS and f.name == "a.jpg" and f.annotations == ()
    assert before <= f.capture_time <= time.time()


def test_folder_sorted_images_only(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt", "d.bmp"):
        data = _png() if name.endswith("png") else _jpeg()
        (tmp_path / name).write_bytes(data if name != "notes.txt" else b"hi")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.jpg").write_bytes(_jpeg())
    src = open_source(str(tmp_path), CAPS, source_id="cam-a")
    assert isinstance(src, FolderSource) and src.kind == "folder" and src.total == 4
    frames = list(src)
    assert [f.name for f in frames] == ["a.JPG", "b.png", "c.webp", "d.bmp"]
    assert {f.source_id for f in frames} == {"cam-a"}
    assert frames[1].image == (tmp_path / "b.png").read_bytes()


def test_empty_folder_is_input_error(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("no images")
    with pytest.raises(InputError, match="no images"):
        open_source(str(tmp_path), CAPS)


def test_video_file_frames_as_jpeg(tmp_path: Path) -> None:
    src = open_source(str(_video(tmp_path / "clip.avi")), CAPS)
    assert isinstance(src, VideoSource) and src.kind == "video" and not src.live
    assert src.total == 6
    frames = list(src)
    assert [f.name for f in frames] == [str(i) for i in range(6)]
    assert all(f.image[:2] == b"\xff\xd8" for f in frames)  # JPEG SOI
    decoded = cv2.imdecode(np.frombuffer(frames[3].image, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3) and abs(int(decoded.mean()) - 90) <= 3
    assert len(list(src)) == 6  # iterating again reopens the file


def test_video_fps_paces_recorded_footage(tmp_path: Path) -> None:
    src = open_source(str(_video(tmp_path / "clip.avi")), CAPS, fps=2)
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    src.pacer = Pacer(2, clock=lambda: now[0], sleep=sleep)
    assert len(list(src)) == 6  # nothing dropped
    assert slept == pytest.approx([0.5] * 5)


def test_not_a_video_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"this is not a video")
    with pytest.raises(InputError, match="cannot open video"):
        open_source(str(path), CAPS)


@pytest.mark.parametrize("as_url", [True, False])
def test_local_stream_is_live_and_reconnects(tmp_path: Path, as_url: bool) -> None:
    path = _video(tmp_path / "live.avi", frames=3)
    spec = path.as_uri() if as_url else str(path)
    slept: list[float] = []
    src = open_source(spec, CAPS, reconnect=Reconnect(3, 0.1, 1.0, sleep=slept.append),
                      live=not as_url)
    assert isinstance(src, LiveSource) and src.live and src.kind == "stream"
    # the file ends after 3 frames: the stream is "lost" and reopened (it plays again)
    frames = list(itertools.islice(src, 7))
    assert [f.name for f in frames] == [str(i) for i in range(7)]
    assert src.reconnects == 2 and slept == [0.1, 0.1]


def test_a_live_sources_guard_runs_before_every_connection(tmp_path: Path) -> None:
    """The guard (a feed added over HTTP: its policy check) runs before the first open and
    before each reopen; when it refuses, the source stops with its InputError and opens no
    more."""
    path = _video(tmp_path / "live.avi", frames=3)
    calls: list[int] = []

    def guard() -> None:
        calls.append(len(calls))
        if len(calls) > 2:
            raise InputError("refused by the feed policy")

    src = open_source(str(path), CAPS, reconnect=Reconnect(5, 0.0, 0.0, sleep=lambda _s: None),
                      live=True, guard=guard)
    assert calls == [0]
    with pytest.raises(InputError, match="refused by the feed policy"):
        list(itertools.islice(src, 20))
    # opened, reopened once (3 + 3 frames), then the third connection was refused
    assert len(calls) == 3 and src.reconnects == 2 and src._cap is None


class _FakeCap:
    def __init__(self, frames: int) -> None:
        self.frames = frames

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.frames <= 0:
            return False, None
        self.frames -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        pass


def test_live_source_backs_off_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import spotline.producer.sources as sources

    opens = iter([_FakeCap(2), None, None, _FakeCap(1)])
    monkeypatch.setattr(sources, "open_capture", lambda target: next(opens, None))
    slept: list[float] = []
    src = LiveSource("rtsp://user:secret@cam.local/stream", "cam", CAPS,
                     reconnect=Reconnect(max_attempts=4, base_delay=1, max_delay=5,
                                         sleep=slept.append)).open()
    names = []
    with pytest.raises(InputError, match="lost") as err:
        for frame in src:
            names.append(frame.name)
    assert names == ["0", "1", "2"]
    # lost after frame 1: reopen fails twice (1 s, 2 s), the third gives one frame; the counter
    # resets, then four failed attempts (1, 2, 4, 5 capped) and it gives up
    assert slept == [1, 2, 4, 1, 2, 4, 5]
    assert "secret" not in str(err.value) and "cam.local" in str(err.value)


def test_live_source_drops_frames_over_fps(monkeypatch: pytest.MonkeyPatch) -> None:
    import spotline.producer.sources as sources

    monkeypatch.setattr(sources, "open_capture", lambda target: _FakeCap(10))
    clock = iter(np.arange(0, 10, 0.25))  # a frame every 0.25 s
    src = LiveSource(0, "cam", CAPS, pacer=Pacer(1, clock=lambda: float(next(clock))),
                     reconnect=Reconnect(0)).open()
    assert src.kind == "camera"
    names = []
    with pytest.raises(InputError, match="camera 0 lost"):
        for frame in src:
            names.append(frame.name)
    assert names == ["0", "4", "8"]  # 1 fps of a 4 fps feed, the rest dropped


def test_missing_camera_is_clear_input_error() -> None:
    with pytest.raises(InputError, match="cannot open camera 57"):
        open_source("57", CAPS)


def test_dataset_uses_its_own_captions(dataset: Path) -> None:
    for spec in (dataset, dataset / "vlm.jsonl"):
        src = open_source(str(spec), ["ignored"])
        assert isinstance(src, DatasetSource) and src.kind == "dataset" and src.total == 2
        assert src.source_id == "til"
        frames = list(src)
        assert [f.name for f in frames] == ["image_0.jpg", "image_1.jpg"]
        assert frames[0].captions == ("grey missile", "red car")
        assert frames[0].annotations == (("grey missile", (1.0, 2.0, 10.0, 12.0)),
                                         ("red car", (5.0, 5.0, 4.0, 4.0)))
        assert frames[1].captions == ("yellow helicopter",)
        assert frames[1].image == (dataset / "images" / "image_1.jpg").read_bytes()


def test_dataset_needs_no_captions_arg(dataset: Path) -> None:
    assert len(list(open_source(str(dataset), []))) == 2


def test_dataset_errors_name_the_line(dataset: Path) -> None:
    (dataset / "vlm.jsonl").write_text('{"image": "image_0.jpg", "annotations": []}\nnot json\n')
    with pytest.raises(InputError, match=r"vlm.jsonl:2"):
        open_source(str(dataset), CAPS)
    (dataset / "vlm.jsonl").write_text('{"image": "gone.jpg", "annotations": []}\n')
    with pytest.raises(InputError, match="image not found"):
        open_source(str(dataset), CAPS)


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "nope.jpg"), CAPS)
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    with pytest.raises(InputError, match="no captions"):
        open_source(str(tmp_path / "a.jpg"), [])
    with pytest.raises(InputError, match="fps"):
        open_source(str(tmp_path / "a.jpg"), CAPS, fps=0)


def test_unreadable_file_while_iterating(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    src = open_source(str(path), CAPS)
    path.unlink()
    with pytest.raises(InputError, match="cannot read"):
        list(src)


def test_classify_and_ids(tmp_path: Path) -> None:
    assert classify("rtsp://h/x") == classify("HTTP://h/x") == classify("file:///x") == "stream"
    assert classify("3") == "camera"
    assert default_source_id("rtsp://u:p@host:554/live/1") == "host_554_live_1"
    assert default_source_id("0") == "camera0"
    assert default_source_id(str(tmp_path / "clip.mp4")) == "clip.mp4"
    assert redact("rtsp://u:p@host/x") == "rtsp://host/x"
    assert redact("rtsp://u:p@ss@host/x?token=t&ch=1") == "rtsp://host/x?token=***&ch=1"
    assert default_source_id("rtsp://u:p@ss@host/x") == "host_x"  # no piece of the password


def test_reconnect_delays() -> None:
    r = Reconnect(max_attempts=6, base_delay=0.5, max_delay=3)
    assert [r.delay(k) for k in range(1, 7)] == [0.5, 1, 2, 3, 3, 3]


# --- captions and limits -------------------------------------------------------------------

def test_load_captions(tmp_path: Path) -> None:
    path = tmp_path / "caps.txt"
    path.write_text("  red car \n\n\t\nblue boat\n", encoding="utf-8")
    assert load_captions(["grey missile"], str(path)) == ("grey missile", "red car", "blue boat")
    assert load_captions(["a "], None) == ("a",)
    with pytest.raises(InputError, match="captions file"):
        load_captions([], str(tmp_path / "missing.txt"))


SMALL = Settings(max_frame_bytes=1000, max_captions=3, max_caption_chars=10, max_pixels=10_000)


@pytest.mark.parametrize(("image", "captions", "match"), [
    (b"", ["car"], "empty image"),
    (b"x" * 1001, ["car"], "too large"),
    ("text", ["car"], "must be bytes"),
    (b"x", [], "no captions"),
    (b"x", "car", "not a single string"),
    (b"x", ["a", "b", "c", "d"], "too many captions"),
    (b"x", ["car", "  "], "caption 1 is empty"),
    (b"x", ["car", ""], "caption 1 is empty"),
    (b"x", ["x" * 11], "too long"),
    (b"x", ["car", 5], "not a string"),
    (b"x", ["bad \ud800 text"], "not valid Unicode"),
])
def test_check_frame_limits(image: object, captions: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_frame(image, captions, SMALL)


def test_check_frame_accepts_within_limits() -> None:
    check_frame(b"x" * 1000, ("a", "b", "c" * 10), SMALL)
    assert validate_frame(_jpeg(40, 30), ["car"], SMALL) == (40, 30)


def test_image_size_reads_header() -> None:
    assert image_size(_jpeg(40, 30)) == (40, 30)
    assert image_size(_png(17, 5)) == (17, 5)
    with pytest.raises(InputError, match="could not be decoded"):
        image_size(b"definitely not an image")
    with pytest.raises(InputError, match="too many pixels"):
        image_size(_png(101, 100), SMALL)  # 10100 > 10000
    assert image_size(_png(100, 100), SMALL) == (100, 100)


def test_image_size_follows_exif_rotation() -> None:
    import io

    im = Image.new("RGB", (40, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: cv2.imdecode returns 30×40
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    assert image_size(data) == (30, 40)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (40, 30)


def test_huge_png_rejected_without_decoding() -> None:
    data = _big_png(20000, 20000)
    assert len(data) < 1_000_000  # 400 Mpx of zeros, tiny on disk
    started = time.perf_counter()
    with pytest.raises(InputError, match="too many pixels"):
        image_size(data)  # PIL's own bomb limit (> 2 × 89 Mpx)
    with pytest.raises(InputError, match="too many pixels"):
        validate_frame(data, ["car"], Settings())
    w, h = 8000, 7000  # 56 Mpx: above the default 50 Mpx, below PIL's limit
    with pytest.raises(InputError, match="8000x7000"):
        image_size(_big_png(w, h))
    assert time.perf_counter() - started < 2.0
