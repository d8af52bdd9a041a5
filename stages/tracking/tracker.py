"""Tracks per source: ByteTrack (bytetrack.py, numpy: no torch, no Ultralytics), with
its whole state as plain arrays.

A source's frames may be handled by any worker of the track stage, one frame after another
(docs/architecture.md, "Tracks"). So the tracker cannot live in a worker's memory: after each
frame its state is exported (``SourceTracker.state``: numbers and numpy arrays, no objects,
no pickle), stored in Redis through common/trackstore.py with the codec's msgpack, and a
worker rebuilds the tracker from it for the next frame (``SourceTracker.from_state``). A
tracker rebuilt after every frame gives exactly the ids of one kept in memory (a test checks
this bit for bit).

The state of the ``BYTETracker`` (Ultralytics 8.4's, which bytetrack.py runs the same
way, ids and all) is: the tracked, lost and removed track pools
(each track: its Kalman mean 8 and covariance 8×8, last box, id, state, activation, score,
class, detection index, first and last frame, tracklet length), the frame counter, and the
tracker's own id counter. The removed pool matters only by id (it is subtracted from the lost
pool), so only its ids are kept, at most the 1000 that Ultralytics keeps itself.

This module also decides when a track's crop must go through the image tower again
(``needs_embedding``): on keyframes, when the box moved (IoU with the box last scored below a
threshold) or when its size changed; otherwise the cached embedding is reused.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

STATE_VERSION = 1
# Per-track integers, in this order, in the "ints" array of a pool.
_INTS = ("track_id", "state", "is_activated", "tracklet_len", "start_frame", "frame_id", "idx")
NO_TRACK = -1


@dataclass(frozen=True)
class TrackerConfig:
    """ByteTrack's settings (Ultralytics' bytetrack.yaml names). The defaults make every box
    of spotline's detector (conf 0.1) a first-stage detection that may start a track."""

    track_high_thresh: float = 0.1
    track_low_thresh: float = 0.05
    new_track_thresh: float = 0.1
    track_buffer: int = 30  # frames a lost track is kept
    match_thresh: float = 0.8
    # Not Ultralytics' True: it multiplies IoU by the detector's score before the 0.2 gate, so
    # a small object found at score 0.4 needed IoU > 0.5 with its prediction and started a new
    # track at each keyframe (on the bench clips: accuracy 0.750 with it, 0.795 without).
    fuse_score: bool = False

    def args(self) -> SimpleNamespace:
        return SimpleNamespace(tracker_type="bytetrack", **self.__dict__)


class _Detections:
    """The detections one frame gives the tracker (what ``Boxes.cpu().numpy()`` offers)."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray) -> None:
        self.xyxy = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
        self.conf = np.asarray(conf, dtype=np.float32).reshape(-1)
        self.cls = np.zeros(len(self.conf), dtype=np.float32)
        if len(self.xyxy) != len(self.conf):
            raise ValueError(f"{len(self.xyxy)} boxes for {len(self.conf)} scores")

    @property
    def xywh(self) -> np.ndarray:
        wh = self.xyxy[:, 2:] - self.xyxy[:, :2]
        return np.concatenate([self.xyxy[:, :2] + wh / 2, wh], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, mask: Any) -> _Detections:
        return _Detections(self.xyxy[mask], self.conf[mask])


def _byte_tracker() -> Any:
    from .bytetrack import BYTETracker, STrack

    return BYTETracker, STrack


class SourceTracker:
    """ByteTrack for one source; ``update`` gives each box of a frame its track id."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        byte_tracker, _ = _byte_tracker()
        self.tracker = byte_tracker(self.config.args())

    @property
    def frame_count(self) -> int:
        """Frames this tracker has seen."""
        return int(self.tracker.frame_id)

    def update(self, boxes: np.ndarray, scores: np.ndarray, skipped: int = 0) -> np.ndarray:
        """Track ids (int64, NO_TRACK for a box no track took) for the xyxy boxes of a frame.

        ``skipped``: frames of the source that never came (dropped by a drop-oldest producer,
        or given up on by the reorder window) since the last update; lost tracks age by them
        (ByteTrack counts its ``track_buffer`` in frames). The Kalman filter still takes one
        step: ByteTrack's motion model has no notion of time between frames.
        """
        if skipped < 0:
            raise ValueError(f"skipped must be >= 0, got {skipped}")
        dets = _Detections(boxes, scores)
        if self.tracker.frame_id > 0 and skipped:
            self._skip(skipped)
        self.tracker.update(dets)
        ids = np.full(len(dets), NO_TRACK, dtype=np.int64)
        for track in self.tracker.tracked_stracks:
            if track.frame_id == self.tracker.frame_id and 0 <= int(track.idx) < len(ids):
                ids[int(track.idx)] = int(track.track_id)
        return ids

    def predict(self, skipped: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A frame the detector did not see: every track moves one step along its Kalman
        prediction (as ``update`` would before matching), and the tracks being followed give
        the frame's boxes. Returns (xyxy boxes float32, their scores, their track ids); no
        track is started, matched or lost (only detections do that).

        The next ``update`` predicts again from here, so N frames between two detections are
        N Kalman steps, as if the detector had run and found nothing new."""
        if skipped < 0:
            raise ValueError(f"skipped must be >= 0, got {skipped}")
        tracker = self.tracker
        if tracker.frame_id > 0 and skipped:
            self._skip(skipped)
        tracker.frame_id += 1
        # The pool update() predicts: the confirmed tracks and the lost ones.
        confirmed = [t for t in tracker.tracked_stracks if t.is_activated]
        tracker.multi_predict([*confirmed, *tracker.lost_stracks])
        shown = tracker.tracked_stracks  # unconfirmed ones too: they stay where they were seen
        boxes = np.array([t.xyxy for t in shown], np.float32).reshape(-1, 4)
        scores = np.array([float(t.score) for t in shown], np.float32)
        return boxes, scores, np.array([int(t.track_id) for t in shown], np.int64)

    def peek(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the followed tracks will be one frame on, without moving them: (xyxy boxes
        float32, track ids, confirmed flags). Each is its Kalman prediction (``predict`` shows
        unconfirmed tracks where they were seen, but ``correct`` steps them when they are
        found: the prediction is where to look for them)."""
        boxes, ids, confirmed = [], [], []
        for t in self.tracker.tracked_stracks:
            mean, _ = t.kalman_filter.predict(t.mean.copy(), t.covariance.copy())
            w, h = float(mean[2] * mean[3]), float(mean[3])
            boxes.append((mean[0] - w / 2, mean[1] - h / 2, mean[0] + w / 2, mean[1] + h / 2))
            ids.append(int(t.track_id))
            confirmed.append(bool(t.is_activated))
        return (np.array(boxes, np.float32).reshape(-1, 4), np.array(ids, np.int64),
                np.array(confirmed, bool))

    def correct(self, measured: Mapping[int, np.ndarray]) -> None:
        """Kalman-update the followed tracks named in ``measured`` (track id -> xyxy box found
        in this frame between detections, templates.py). Their last detection, length,
        score and confirmation stay as they were: only the detector confirms, starts or loses a
        track. An unconfirmed one found takes its Kalman step here (ByteTrack predicts only
        confirmed tracks), so that it learns its speed and the next detection meets it where
        it is, not where it was first seen."""
        for t in self.tracker.tracked_stracks:
            box = measured.get(int(t.track_id))
            if box is None or t.mean is None:
                continue
            if not t.is_activated:
                t.mean, t.covariance = t.kalman_filter.predict(t.mean, t.covariance)
            tlwh = np.array([box[0], box[1], box[2] - box[0], box[3] - box[1]], np.float64)
            t.mean, t.covariance = t.kalman_filter.update(t.mean, t.covariance,
                                                          t.convert_coords(tlwh))

    def known(self) -> set[int]:
        """Ids of the tracks followed or lost (not removed)."""
        return {int(t.track_id) for t in (*self.tracker.tracked_stracks,
                                          *self.tracker.lost_stracks)}

    def young(self, frames: int) -> bool:
        """True while there is nothing solid to predict: no confirmed track is followed, or
        one has been matched in fewer than ``frames`` detections (its Kalman velocity is still
        a guess). Unconfirmed tracks (one detection; often the detector's flicker) do not
        count: the next detection confirms or drops them."""
        confirmed = [t for t in self.tracker.tracked_stracks if t.is_activated]
        return not confirmed or any(int(t.tracklet_len) < frames for t in confirmed)

    def outrun(self, ratio: float, ahead: int = 1, ignore: frozenset[int] = frozenset()) -> bool:
        """True when a followed track would have moved, ``ahead`` frames from now, more than
        ``ratio`` times its smaller side since its last detection (Kalman speed × frames):
        its predicted box is then too likely off the object (small or fast objects). Tracks
        in ``ignore`` (those measured between detections) do not count."""
        tracker = self.tracker
        for t in tracker.tracked_stracks:
            if not t.is_activated or int(t.track_id) in ignore:
                continue
            mean = t.mean
            frames = tracker.frame_id + ahead - int(t.frame_id)
            side = min(float(mean[2] * mean[3]), float(mean[3]))
            if float(np.hypot(mean[4], mean[5])) * frames > ratio * max(side, 1.0):
                return True
        return False

    def _skip(self, frames: int) -> None:
        """What ``frames`` empty updates would have done: tracks unseen for longer than
        ``track_buffer`` by then are removed. (Tracks still within it stay in their pool; the
        Kalman filter does not take the missed steps.)"""
        tracker = self.tracker
        tracker.frame_id += frames
        removed = [t for t in (*tracker.tracked_stracks, *tracker.lost_stracks)
                   if tracker.frame_id - t.end_frame > tracker.max_frames_lost]
        for track in removed:
            track.mark_removed()
        gone = {t.track_id for t in removed}
        tracker.tracked_stracks = [t for t in tracker.tracked_stracks if t.track_id not in gone]
        tracker.lost_stracks = [t for t in tracker.lost_stracks if t.track_id not in gone]
        tracker.removed_stracks.extend(removed)
        del tracker.removed_stracks[:-1000]  # Ultralytics' own cap on the removed pool

    def alive(self) -> int:
        """Tracks currently followed (not lost)."""
        return sum(1 for t in self.tracker.tracked_stracks if t.is_activated)

    # --- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this tracker, as ints and numpy arrays."""
        tracker = self.tracker
        next_id = next(tracker._ids)  # peek: put the counter back where it was
        tracker._ids = iter(range(next_id, sys.maxsize))
        return {"v": STATE_VERSION, "frame_id": int(tracker.frame_id), "next_id": next_id,
                "tracked": _pack(tracker.tracked_stracks), "lost": _pack(tracker.lost_stracks),
                "removed": np.array([t.track_id for t in tracker.removed_stracks], np.int64)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None,
                   config: TrackerConfig | None = None) -> SourceTracker:
        """A tracker continuing where ``state`` left off (a fresh one for None)."""
        self = cls(config)
        if state is None:
            return self
        if state.get("v") != STATE_VERSION:
            raise ValueError(f"tracker state version {state.get('v')!r} is not {STATE_VERSION}")
        tracker = self.tracker
        tracker.frame_id = int(state["frame_id"])
        tracker._ids = iter(range(int(state["next_id"]), sys.maxsize))
        tracker.tracked_stracks = _unpack(state["tracked"], tracker)
        tracker.lost_stracks = _unpack(state["lost"], tracker)
        tracker.removed_stracks = [_removed(int(i), tracker) for i in state["removed"]]
        return self


def _pack(tracks: list[Any]) -> dict[str, np.ndarray]:
    n = len(tracks)
    return {
        "ints": np.array([[int(getattr(t, f)) for f in _INTS] for t in tracks],
                         np.int64).reshape(n, len(_INTS)),
        "score": np.array([float(t.score) for t in tracks], np.float32),
        "cls": np.array([float(t.cls) for t in tracks], np.float32),
        "tlwh": np.array([t._tlwh for t in tracks], np.float32).reshape(n, 4),
        "mean": np.array([t.mean for t in tracks], np.float64).reshape(n, 8),
        "cov": np.array([t.covariance for t in tracks], np.float64).reshape(n, 8, 8),
    }


def _unpack(pool: Mapping[str, np.ndarray], tracker: Any) -> list[Any]:
    _, strack = _byte_tracker()
    ints = np.asarray(pool["ints"]).reshape(-1, len(_INTS))
    tracks = []
    for row, (values, score, cls, tlwh, mean, cov) in enumerate(zip(
            ints, pool["score"], pool["cls"], pool["tlwh"], pool["mean"], pool["cov"],
            strict=True)):
        ltwh = np.asarray(tlwh, np.float32)
        track = strack(np.array([*(ltwh[:2] + ltwh[2:] / 2), *ltwh[2:], row], np.float32),
                       np.float32(score), np.float32(cls))
        track._tlwh = ltwh.copy()
        for name, value in zip(_INTS, values, strict=True):
            setattr(track, name, int(value))
        track.is_activated = bool(track.is_activated)
        track.mean = np.array(mean, np.float64)
        track.covariance = np.array(cov, np.float64)
        track.kalman_filter = tracker.kalman_filter
        track.next_id = tracker._ids.__next__
        tracks.append(track)
    return tracks


def _removed(track_id: int, tracker: Any) -> Any:
    """A stand-in for a removed track: the tracker only ever reads its id."""
    _, strack = _byte_tracker()
    track = strack(np.array([0, 0, 1, 1, 0], np.float32), np.float32(0), np.float32(0))
    track.track_id = track_id
    track.mark_removed()
    return track


# --- embedding reuse -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReuseConfig:
    """When a track's cached image embedding may stand for its crop in a new frame."""

    keyframe_every: int = 10  # frames; every K-th frame of a track is embedded again
    min_iou: float = 0.7  # the box moved more than this since it was scored: embed again
    max_size_change: float = 0.2  # relative change of width or height: embed again
    # A moved (or resized) crop is embedded again only while its track contends for a caption:
    # its posterior log-odds within this margin of the best track's, with another track as
    # close (SourceState.contends). None: every moved crop is embedded again.
    contend_margin: float | None = None

    def __post_init__(self) -> None:
        if self.keyframe_every < 1 or not 0.0 <= self.min_iou <= 1.0 \
                or self.max_size_change < 0 \
                or (self.contend_margin is not None and self.contend_margin < 0):
            raise ValueError("keyframe_every >= 1, 0 <= min_iou <= 1, max_size_change >= 0, "
                             "contend_margin None or >= 0")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def needs_embedding(seq: int, box: np.ndarray, scored_seq: int | None,
                    scored_box: np.ndarray | None, config: ReuseConfig) -> bool:
    """True when the crop of ``box`` (frame ``seq``) must be embedded again: nothing cached,
    a keyframe (``keyframe_every`` frames since it was scored), or the crop changed."""
    return stale(seq, scored_seq, scored_box, config) or crop_changed(box, scored_box, config)


def stale(seq: int, scored_seq: int | None, scored_box: np.ndarray | None,
          config: ReuseConfig) -> bool:
    """True when a track's cached embedding cannot stand for it whatever the crop looks like:
    nothing cached, or a keyframe (``keyframe_every`` frames since it was scored)."""
    if scored_seq is None or scored_box is None:
        return True
    return seq - scored_seq >= config.keyframe_every or seq < scored_seq


def crop_changed(box: np.ndarray, scored_box: np.ndarray | None, config: ReuseConfig) -> bool:
    """True when ``box`` moved (IoU under ``min_iou``) or changed size (more than
    ``max_size_change`` in width or height) since the cached embedding's box."""
    if scored_box is None:
        return True
    if iou(box, scored_box) < config.min_iou:
        return True
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    sw, sh = float(scored_box[2] - scored_box[0]), float(scored_box[3] - scored_box[1])
    if sw <= 0 or sh <= 0:
        return True
    return abs(w / sw - 1.0) > config.max_size_change or abs(h / sh - 1.0) > config.max_size_change
