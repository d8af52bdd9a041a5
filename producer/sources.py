"""Frame sources for producers: an image, a folder, a video, a stream or camera, a TIL dataset.

``open_source(spec, captions)`` picks the kind from the spec and checks that it can be read;
iterating a source yields ``SourceFrame``s with the image bytes as the feed sent them (video
frames JPEG-encoded). Live sources (cameras, streams) reopen with exponential backoff when the
feed is lost and raise ``InputError`` once the attempts are spent. ``check_frame``,
``validate_frame`` (common/limits.py) and ``image_size`` (common/images.py), re-exported
here, are the limits every frame must pass before it enters the pipeline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from ..common.errors import InputError
from ..common.images import encode_jpeg
from ..common.images import image_size as image_size  # re-exported: the producers' check
from ..common.limits import check_frame as check_frame  # re-exported
from ..common.limits import validate_frame as validate_frame  # re-exported
from ..common.redact import redact_url
from .dataset import DATASET_FILE, TilImage, load_til

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "file")
OPEN_TIMEOUT_MS = 10_000  # OpenCV/FFmpeg open and read timeouts for live feeds

Annotation = tuple[str, tuple[float, float, float, float]]


@dataclass(frozen=True)
class SourceFrame:
    """One frame from a source: encoded image bytes, its captions and where it came from."""

    image: bytes
    captions: tuple[str, ...]
    capture_time: float
    source_id: str
    name: str
    annotations: tuple[Annotation, ...] = ()  # ground truth (datasets only)


@dataclass(frozen=True)
class Reconnect:
    """Exponential backoff for live sources: attempt k waits min(max_delay, base * 2**(k-1))."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@dataclass
class Pacer:
    """An fps limit: recorded sources wait for their turn, live sources drop early frames."""

    fps: float | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _next: float = field(default=float("-inf"), init=False)

    def wait(self) -> None:
        """Sleep until the next frame is due (recorded footage: lose nothing)."""
        if not self.fps:
            return
        now = self.clock()
        if now < self._next:
            self.sleep(self._next - now)
        self._next = max(now, self._next) + 1.0 / self.fps

    def due(self) -> bool:
        """Whether a live frame read now should be kept (else it is dropped)."""
        if not self.fps:
            return True
        now = self.clock()
        if now < self._next:
            return False
        self._next = now + 1.0 / self.fps
        return True


# (image as bytes or a BGR array to encode, name, captions, annotations)
_Item = tuple["bytes | np.ndarray", str, tuple[str, ...], tuple[Annotation, ...]]


class Source:
    """A finite or live sequence of frames; iterate it for ``SourceFrame``s."""

    kind: ClassVar[str] = "source"
    live: ClassVar[bool] = False

    def __init__(self, source_id: str, captions: tuple[str, ...] = (),
                 pacer: Pacer | None = None) -> None:
        self.source_id = source_id
        self.captions = tuple(captions)
        self.pacer = pacer or Pacer()

    def open(self) -> Source:
        """Check that the source can be read (raises InputError); returns itself."""
        return self

    def close(self) -> None:
        """Release what the source holds (captures)."""

    @property
    def total(self) -> int | None:
        """How many frames it will yield, when known."""
        return None

    def _items(self) -> Iterator[_Item]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[SourceFrame]:
        for image, name, captions, truth in self._items():
            if self.live and not self.pacer.due():
                continue
            if not self.live:
                self.pacer.wait()
            now = time.time()
            data = image if isinstance(image, bytes) else encode_jpeg(image)
            yield SourceFrame(data, captions, now, self.source_id, name, truth)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source_id!r}>"


class ImageSource(Source):
    """One image file, sent once."""

    kind = "image"

    def __init__(self, path: str | Path, source_id: str, captions: tuple[str, ...] = (),
                 pacer: Pacer | None = None) -> None:
        super().__init__(source_id, captions, pacer)
        self.path = Path(path)

    def open(self) -> Source:
        """Check that the file exists."""
        if not self.path.is_file():
            raise InputError(f"image file not found: {self.path}")
        return self

    @property
    def total(self) -> int | None:
        """One frame."""
        return 1

    def _items(self) -> Iterator[_Item]:
        yield read_bytes(self.path), self.path.name, self.captions, ()


class FolderSource(Source):
    """The images of a folder (not recursive), in sorted name order."""

    kind = "folder"

    def __init__(self, path: str | Path, source_id: str, captions: tuple[str, ...] = (),
                 pacer: Pacer | None = None) -> None:
        super().__init__(source_id, captions, pacer)
        self.path = Path(path)
        self.files: list[Path] = []

    def open(self) -> Source:
        """List the images; an empty or unreadable folder is an InputError."""
        try:
            self.files = sorted(p for p in self.path.iterdir()
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        except OSError as exc:
            raise InputError(f"cannot read folder {self.path}: {exc.strerror or exc}") from None
        if not self.files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {self.path}")
        return self

    @property
    def total(self) -> int | None:
        """The number of images."""
        return len(self.files)

    def _items(self) -> Iterator[_Item]:
        for path in self.files:
            yield read_bytes(path), path.name, self.captions, ()


class DatasetSource(Source):
    """A TIL dataset (vlm.jsonl + images/): each image with its own captions and ground truth."""

    kind = "dataset"

    def __init__(self, path: str | Path, source_id: str, pacer: Pacer | None = None) -> None:
        super().__init__(source_id, (), pacer)
        self.path = Path(path)
        self.images: list[TilImage] = []

    def open(self) -> Source:
        """Parse vlm.jsonl (raises InputError naming the bad line)."""
        self.images = load_til(self.path)
        if not self.images:
            raise InputError(f"dataset {self.path} has no images")
        return self

    @property
    def total(self) -> int | None:
        """The number of images."""
        return len(self.images)

    def _items(self) -> Iterator[_Item]:
        for img in self.images:
            yield read_bytes(img.image_path), img.image_path.name, img.captions, img.annotations


class VideoSource(Source):
    """A recorded video file, read with OpenCV; frames are JPEG-encoded (quality 95)."""

    kind = "video"

    def __init__(self, path: str | Path, source_id: str, captions: tuple[str, ...] = (),
                 pacer: Pacer | None = None) -> None:
        super().__init__(source_id, captions, pacer)
        self.path = Path(path)
        self._cap: Any = None

    def open(self) -> Source:
        """Open the file with OpenCV (raises InputError when it cannot)."""
        if not self.path.is_file():
            raise InputError(f"video file not found: {self.path}")
        self._cap = open_capture(str(self.path))
        if self._cap is None:
            raise InputError(f"cannot open video {self.path}: not a format OpenCV can read")
        return self

    def close(self) -> None:
        """Release the capture."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def total(self) -> int | None:
        """The frame count the container reports (an estimate), when known."""
        cap = self._cap or open_capture(str(self.path))
        if cap is None:
            return None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if cap is not self._cap:
            cap.release()
        return count if count > 0 else None

    def _items(self) -> Iterator[_Item]:
        if self._cap is None:
            self.open()
        index = 0
        try:
            while True:
                ok, frame = self._cap.read()
                if not ok:
                    break
                yield frame, str(index), self.captions, ()
                index += 1
        finally:
            self.close()
        if index == 0:
            raise InputError(f"no frames could be read from video {self.path}")


class LiveSource(Source):
    """A camera index or a stream URL; reopened with backoff when frames stop coming."""

    live = True

    def __init__(self, target: str | int, source_id: str, captions: tuple[str, ...] = (),
                 pacer: Pacer | None = None, reconnect: Reconnect | None = None,
                 guard: Callable[[], None] | None = None) -> None:
        super().__init__(source_id, captions, pacer)
        self.target = target
        self.reconnect = reconnect or Reconnect()
        # called before every open and reopen; raises InputError to refuse the connection
        # (a feed added over HTTP: its host is resolved and checked again each time)
        self.guard = guard
        self.reconnects = 0  # reopen attempts made so far (for metrics and tests)
        self._cap: Any = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        """camera or stream."""
        return "camera" if isinstance(self.target, int) else "stream"

    @property
    def label(self) -> str:
        """The target for messages, without credentials."""
        return f"camera {self.target}" if isinstance(self.target, int) else redact(self.target)

    def open(self) -> Source:
        """Open the feed once; failing at start is an InputError (no retries)."""
        if self.guard is not None:
            self.guard()
        self._cap = open_capture(self.target)
        if self._cap is None:
            raise InputError(f"cannot open {self.label}" + (
                ": no such camera or it is in use" if self.kind == "camera" else ""))
        return self

    def close(self) -> None:
        """Release the capture."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _read(self) -> tuple[bool, Any]:
        if self._cap is None:
            return False, None
        try:
            return self._cap.read()
        except cv2.error:
            return False, None

    def _reopen(self, attempt: int) -> None:
        self.close()
        self.reconnect.sleep(self.reconnect.delay(attempt))
        self.reconnects += 1
        if self.guard is not None:
            self.guard()
        self._cap = open_capture(self.target)

    def _items(self) -> Iterator[_Item]:
        if self._cap is None:
            self.open()
        index, failures = 0, 0
        try:
            while True:
                ok, frame = self._read()
                if ok:
                    failures = 0
                    yield frame, str(index), self.captions, ()
                    index += 1
                    continue
                failures += 1
                if failures > self.reconnect.max_attempts:
                    raise InputError(f"{self.label} lost: no frames after "
                                     f"{self.reconnect.max_attempts} reconnect attempts")
                self._reopen(failures)
        finally:
            self.close()


def open_capture(target: str | int) -> Any:
    """An opened cv2.VideoCapture for a path, URL or camera index, or None."""
    try:
        if isinstance(target, int):
            cap = cv2.VideoCapture(target)
        else:
            cap = cv2.VideoCapture(target, cv2.CAP_ANY, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS])
    except cv2.error:
        return None
    if not cap.isOpened():
        cap.release()
        return None
    return cap


def read_bytes(path: Path) -> bytes:
    """A file's bytes; unreadable files are an InputError."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def is_url(spec: str) -> bool:
    """Whether a spec is a stream URL (rtsp, http, file, ...)."""
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme.lower() in STREAM_SCHEMES


def redact(url: str) -> str:
    """A URL without its user:password part (cut at the last '@' before the path: a password
    may hold one) and with secret query values (token, password, signature...) masked."""
    return redact_url(url, drop_user=True)


def default_source_id(spec: str) -> str:
    """A readable id for a spec: file stem, camera index or URL host/path, no credentials."""
    if spec.isdigit():
        return f"camera{spec}"
    text = redact(spec).partition("://")[2] if is_url(spec) else Path(spec).name or spec
    if not is_url(spec) and text == DATASET_FILE:
        text = Path(spec).resolve().parent.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "source"


def classify(spec: str) -> str:
    """The kind of source a spec names: image, folder, video, stream, camera or dataset."""
    if is_url(spec):
        return "stream"
    path = Path(spec)
    if spec.isdigit() and not path.exists():
        return "camera"
    if not path.exists():
        raise InputError(f"no such file or folder: {spec}")
    if path.is_dir():
        return "dataset" if (path / DATASET_FILE).is_file() else "folder"
    if path.suffix.lower() == ".jsonl":
        return "dataset"
    return "image" if path.suffix.lower() in IMAGE_EXTS else "video"


def open_source(spec: str, captions: Iterable[str], source_id: str | None = None,
                fps: float | None = None, *, reconnect: Reconnect | None = None,
                live: bool = False, guard: Callable[[], None] | None = None) -> Source:
    """Open the source a spec names (``live=True`` reads a video file as a live stream;
    ``guard`` is called before a live source connects, and before each reconnect)."""
    kind = classify(str(spec))
    kind = "stream" if live and kind == "video" else kind
    caps = tuple(captions)
    if kind != "dataset" and not caps:
        raise InputError("no captions: give at least one caption for this source")
    if fps is not None and fps <= 0:
        raise InputError(f"fps must be > 0, got {fps}")
    sid = source_id or default_source_id(str(spec))
    pacer = Pacer(fps)
    source: Source
    if kind == "dataset":
        source = DatasetSource(spec, sid, pacer)
    elif kind in ("stream", "camera"):
        target: str | int = int(spec) if kind == "camera" else str(spec)
        source = LiveSource(target, sid, caps, pacer, reconnect, guard)
    else:
        cls = {"image": ImageSource, "folder": FolderSource, "video": VideoSource}[kind]
        source = cls(spec, sid, caps, pacer)
    return source.open()


def load_captions(captions: Iterable[str], captions_file: str | Path | None = None
                  ) -> tuple[str, ...]:
    """The given captions, then those of the file (one a line, blank lines ignored), stripped."""
    out = [c.strip() for c in captions]
    if captions_file:
        try:
            text = Path(captions_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read captions file {captions_file}: "
                             f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise InputError(f"captions file {captions_file} is not UTF-8 text") from None
        out.extend(line.strip() for line in text.splitlines() if line.strip())
    return tuple(out)
