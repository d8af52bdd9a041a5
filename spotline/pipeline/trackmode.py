"""Video in one process, per-frame mode and track mode, with the pipeline's stage code.

Per-frame mode is the seed's method on every frame: every crop through the upscaler and the
image tower, each caption its argmax box. Track mode is the track stage itself
(``stages.track.Track``: it follows the boxes per source with ByteTrack, embeds a track's crop
only when it changed or on keyframes, weighs evidence over frames and assigns one box per
caption), run here on frames given one by one. Both use the same Detect, Upscale and Score
objects, so the in-process figures of ``spotline bench video`` compare the methods, not two
implementations; its headline figures come from the streaming pipeline (spotline/bench/video.py).

A source's tracking state lives in this process (``LocalTrackStore``, ``LocalEmbeddingCache``:
the Redis stores' methods on dicts) or, given ``store`` and ``cache``, in Redis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spotline.common.codec import decode_state, encode_state
from spotline.common.envelope import Envelope
from spotline.common.settings import Settings
from spotline.common.trackstore import CachedEmbedding, EmbeddingCache, TrackStore
from spotline.stages import runtime
from spotline.stages.collect import frame_result, ltwh
from spotline.stages.detect import Detect
from spotline.stages.track import ANSWERS_KEPT, Track, TrackStats
from spotline.stages.tracking.assign import assign
from spotline.stages.tracking.grounding import NO_TRACK
from spotline.stages.tracking.source import Embedder, TrackOptions

BoxLTWH = tuple[float, float, float, float]


@dataclass(frozen=True)
class FrameAnswer:
    """One frame's answer: per caption its box ([l, t, w, h]; None: not in view), score,
    track id (NO_TRACK in per-frame mode), and how many crops went through the image tower."""

    boxes: tuple[BoxLTWH | None, ...]
    scores: tuple[float, ...]
    track_ids: tuple[int, ...]
    crops_embedded: int
    boxes_found: int
    detected: bool = True  # False: the boxes are the tracks' Kalman predictions


@dataclass
class Detected:
    """A frame after detect: its boxes (xyxy), detector scores and plain crops."""

    boxes: np.ndarray
    det_scores: np.ndarray
    crops: list[np.ndarray]


class FrameModels:
    """The detect stage and the track stage's embedder (upscale and score), set up once, used
    frame by frame."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.detect = Detect(settings)
        self.detect.setup()
        self.embedder = Embedder(settings)
        self.embedder.setup()
        runtime.set_threads(settings)  # one process runs every stage: all cores (auto)

    def detected(self, frame_id: str, image: bytes, captions: Sequence[str]) -> Detected:
        env = Envelope(frame_id=frame_id, source_id="video", captions=tuple(captions),
                       image=image)
        parts = sorted((e for _, e in self.detect.process([env])), key=lambda e: e.part)
        with_boxes = [p for p in parts if p.boxes is not None and len(p.boxes)]
        if not with_boxes:
            return Detected(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])
        return Detected(np.concatenate([p.boxes for p in with_boxes]),  # type: ignore[misc]
                        np.concatenate([p.det_scores for p in with_boxes]),  # type: ignore[misc]
                        [c for p in with_boxes for c in p.crops])

    def embed(self, frame_id: str, crops: list[np.ndarray]) -> np.ndarray:
        """Image embeddings (N×D float32) of plain crops, upscaled first when upscale is on."""
        return self.embedder.embed(frame_id, crops)

    def scores(self, captions: Sequence[str], embeds: np.ndarray) -> np.ndarray:
        """Captions × boxes scores (the score stage's formula) for image embeddings."""
        return self.embedder.scores(captions, embeds)


class PerFrame:
    """The seed's method on each frame: every crop embedded, each caption its argmax."""

    def __init__(self, models: FrameModels, joint: bool = False) -> None:
        self.models = models
        self.joint = joint

    def frame(self, frame_id: str, image: bytes, captions: Sequence[str]) -> FrameAnswer:
        return self.frame_scored(frame_id, image, captions)[0]

    def frame_scored(self, frame_id: str, image: bytes,
                     captions: Sequence[str]) -> tuple[FrameAnswer, np.ndarray, np.ndarray]:
        """The answer, and the captions × boxes scores and xyxy boxes it came from."""
        det = self.models.detected(frame_id, image, captions)
        embeds = self.models.embed(frame_id, det.crops)
        scores = self.models.scores(captions, embeds)
        if len(det.boxes) == 0:
            return (FrameAnswer(tuple(None for _ in captions), tuple(np.nan for _ in captions),
                                tuple(NO_TRACK for _ in captions), 0, 0), scores, det.boxes)
        picks = assign(scores, joint=self.joint, captions=captions)
        answer = FrameAnswer(tuple(ltwh(det.boxes[i]) for i in picks),
                             tuple(float(scores[r, i]) for r, i in enumerate(picks)),
                             tuple(NO_TRACK for _ in captions), len(det.crops), len(det.boxes))
        return answer, scores, det.boxes


class LocalTrackStore:
    """TrackStore's methods on a dict in this process: each source's state and its answers,
    kept as the codec's bytes (as Redis keeps them), with the same compare-and-set."""

    def __init__(self, answers_kept: int = ANSWERS_KEPT) -> None:
        self.states: dict[str, tuple[int, bytes]] = {}
        self.answers: dict[str, dict[str, bytes]] = {}
        self.answers_kept = answers_kept

    def load(self, source_id: str) -> tuple[int, dict[str, Any] | None]:
        seq, raw = self.states.get(source_id, (-1, b""))
        return (seq, decode_state(raw)) if raw else (-1, None)

    def save(self, source_id: str, seq: int, state: dict[str, Any],
             answer: tuple[str, dict[str, Any]] | None = None) -> bool:
        if self.states.get(source_id, (-1, b""))[0] >= seq:
            return False
        self.states[source_id] = (seq, encode_state(state))
        if answer is not None:
            kept = self.answers.setdefault(source_id, {})
            kept[answer[0]] = encode_state(answer[1])
            while len(kept) > self.answers_kept:
                del kept[next(iter(kept))]
        return True

    def answer(self, source_id: str, frame_id: str) -> dict[str, Any] | None:
        raw = self.answers.get(source_id, {}).get(frame_id)
        return None if raw is None else decode_state(raw)


class LocalEmbeddingCache:
    """EmbeddingCache's methods on a dict in this process (no TTL, no cap)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[int, bytes]] = {}

    def get(self, source_id: str, track_ids: Iterable[int]) -> dict[int, CachedEmbedding]:
        kept = self.entries.get(source_id, {})
        return {int(t): CachedEmbedding.from_bytes(kept[int(t)]) for t in track_ids
                if int(t) in kept}

    def put(self, source_id: str, entries: Mapping[int, CachedEmbedding]) -> int:
        self.entries.setdefault(source_id, {}).update(
            {int(t): e.to_bytes() for t, e in entries.items()})
        return 0

    def size(self, source_id: str) -> int:
        return len(self.entries.get(source_id, {}))


class Tracked:
    """Track mode in this process: the track stage's own step (``stages.track.Track.frame``:
    sequence, propagate-or-detect, cache, embed, ground, save) on the frames given, with the
    models of ``models``, its state and cache in this process or, with ``store`` and
    ``cache``, in Redis as the stage keeps them. Frames of a source must come in order."""

    def __init__(self, models: FrameModels, options: TrackOptions | None = None,
                 store: TrackStore | None = None, cache: EmbeddingCache | None = None,
                 calibration: Any = None) -> None:
        # abstaining is what ``options`` and ``calibration`` say, not the settings' auto
        settings = models.settings.replace(tracking=True, not_in_view="false",
                                           ask_memory=False)
        stores = (store or LocalTrackStore(), cache or LocalEmbeddingCache())
        self.stage = Track(settings, stores=stores, embedder=models.embedder,
                           detector=models.detect)
        self.stage.setup()
        self.stage.options = options or TrackOptions()
        self.stage.calibration = calibration
        self.settings = settings

    @property
    def stats(self) -> TrackStats:
        """What the stage did, summed over frames."""
        return self.stage.stats

    def frame(self, source: str, seq: int, frame_id: str, image: bytes,
              captions: Sequence[str]) -> FrameAnswer:
        """Frame ``seq`` (0, 1, ...) of ``source``, as the track stage answers it (from the
        encoded image: the stage runs the detector itself, as on frames detect leaves it)."""
        before = dataclasses.replace(self.stats)
        env = Envelope(frame_id=frame_id, source_id=source, captions=tuple(captions),
                       image=image, seq=seq + 1)  # producers number a source's frames from 1
        out = self.stage.frame(env)
        result = frame_result(out, self.settings)
        now = self.stats
        absent = result.absent or (False,) * len(result.boxes)
        return FrameAnswer(
            tuple(None if gone else box for box, gone in zip(result.boxes, absent, strict=True)),
            result.scores, result.track_ids or tuple(NO_TRACK for _ in captions),
            now.embedded - before.embedded,
            0 if out.boxes is None else len(out.boxes),
            detected=now.predicted == before.predicted)
