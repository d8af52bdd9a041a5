"""ByteTrack in numpy: the tracker of track mode without torch or Ultralytics.

ByteTrack (Zhang et al., 2022) as Ultralytics 8.4's ``BYTETracker`` runs it, the tracker track
mode was measured with, written again here so that the track worker on exported models imports
neither torch nor Ultralytics (importing Ultralytics' tracker loads torch: ~700 MiB resident).
Same classes, attributes and steps, so ``tracker.py`` drives either and its saved state
(plain arrays) is one format for both; a test runs both on the same scenes and compares every
track id.

Per frame: the Kalman filter (constant velocity in centre, aspect ratio and height) predicts
every followed and lost track; high-score detections are matched to them by IoU (Hungarian
with a cost limit), then the remaining followed tracks to the low-score detections; then
unconfirmed tracks (seen once) to what is left; new tracks start from unmatched high-score
detections; lost tracks unseen for ``track_buffer`` frames are removed. The assignment with a
cost limit is lapjv's with ``extend_cost``: the square problem in which every row and column
may also go unmatched at half the limit (lsap.py solves it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .lsap import linear_sum_assignment


class TrackState:
    New = 0
    Tracked = 1
    Lost = 2
    Removed = 3


class KalmanFilterXYAH:
    """Constant-velocity Kalman filter of (centre x, centre y, aspect w/h, height)."""

    def __init__(self) -> None:
        self._motion_mat = np.eye(8)
        for i in range(4):
            self._motion_mat[i, 4 + i] = 1.0
        self._update_mat = np.eye(4, 8)
        self._std_weight_position = 1.0 / 20
        self._std_weight_velocity = 1.0 / 160

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        measurement = np.asarray(measurement, dtype=np.float64)
        mean = np.r_[measurement, np.zeros_like(measurement)]
        h, wp, wv = measurement[3], self._std_weight_position, self._std_weight_velocity
        std = [2 * wp * h, 2 * wp * h, 1e-2, 2 * wp * h, 10 * wv * h, 10 * wv * h, 1e-5,
               10 * wv * h]
        return mean, np.diag(np.square(std))

    def _motion_std(self, h: Any) -> list[Any]:
        wp, wv = self._std_weight_position, self._std_weight_velocity
        ones = np.ones_like(h)
        return [wp * h, wp * h, 1e-2 * ones, wp * h, wv * h, wv * h, 1e-5 * ones, wv * h]

    def predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        motion_cov = np.diag(np.square(np.r_[self._motion_std(mean[3])]))
        mean = np.dot(mean, self._motion_mat.T)
        covariance = np.linalg.multi_dot((self._motion_mat, covariance,
                                          self._motion_mat.T)) + motion_cov
        return mean, covariance

    def multi_predict(self, mean: np.ndarray, covariance: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        sqr = np.square(np.r_[self._motion_std(mean[:, 3])]).T
        motion_cov = np.zeros((sqr.shape[0], 8, 8))
        motion_cov[:, range(8), range(8)] = sqr
        mean = np.dot(mean, self._motion_mat.T)
        left = np.dot(self._motion_mat, covariance).transpose((1, 0, 2))
        return mean, np.dot(left, self._motion_mat.T) + motion_cov

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wp = self._std_weight_position
        std = [wp * mean[3], wp * mean[3], 1e-1, wp * mean[3]]
        return mean[:4].copy(), covariance[:4, :4] + np.diag(np.square(std))

    def update(self, mean: np.ndarray, covariance: np.ndarray,
               measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        projected_mean, projected_cov = self.project(mean, covariance)
        gain = np.linalg.solve(projected_cov, covariance[:, :4].T).T
        new_mean = mean + np.dot(measurement - projected_mean, gain.T)
        new_cov = covariance - np.linalg.multi_dot((gain, projected_cov, gain.T))
        return new_mean, new_cov


class STrack:
    """One track: its box, Kalman state, score, id, state and frames."""

    shared_kalman = KalmanFilterXYAH()

    def __init__(self, xywh: np.ndarray, score: float, cls: Any) -> None:
        xywh = np.asarray(xywh)
        box = np.asarray(xywh[:4], dtype=np.float32).copy()
        box[:2] -= box[2:] / 2
        self._tlwh = box
        self.kalman_filter: KalmanFilterXYAH | None = None
        self.mean: np.ndarray | None = None
        self.covariance: np.ndarray | None = None
        self.track_id = 0
        self.is_activated = False
        self.state = TrackState.New
        self.score = score
        self.tracklet_len = 0
        self.cls = cls
        self.idx = xywh[-1]
        self.angle = None
        self.start_frame = 0
        self.frame_id = 0
        self.next_id: Callable[[], int] = _no_id

    @property
    def end_frame(self) -> int:
        return self.frame_id

    def mark_lost(self) -> None:
        self.state = TrackState.Lost

    def mark_removed(self) -> None:
        self.state = TrackState.Removed

    @staticmethod
    def multi_predict(stracks: list[STrack]) -> None:
        if not stracks:
            return
        mean = np.asarray([st.mean for st in stracks])
        cov = np.asarray([st.covariance for st in stracks])
        for i, st in enumerate(stracks):
            if st.state != TrackState.Tracked:
                mean[i][7] = 0
        mean, cov = STrack.shared_kalman.multi_predict(mean, cov)
        for st, m, c in zip(stracks, mean, cov, strict=True):
            st.mean, st.covariance = m, c

    def activate(self, kalman_filter: KalmanFilterXYAH, frame_id: int) -> None:
        self.kalman_filter = kalman_filter
        self.track_id = self.next_id()
        self.mean, self.covariance = kalman_filter.initiate(self.convert_coords(self._tlwh))
        self.tracklet_len = 0
        self.state = TrackState.Tracked
        if frame_id == 1:
            self.is_activated = True
        self.frame_id = frame_id
        self.start_frame = frame_id

    def re_activate(self, new_track: STrack, frame_id: int, new_id: bool = False) -> None:
        self._measure(new_track)
        self.tracklet_len = 0
        self.frame_id = frame_id
        if new_id:
            self.track_id = self.next_id()

    def update(self, new_track: STrack, frame_id: int) -> None:
        self.frame_id = frame_id
        self.tracklet_len += 1
        self._measure(new_track)

    def _measure(self, new_track: STrack) -> None:
        assert self.kalman_filter is not None
        self.mean, self.covariance = self.kalman_filter.update(
            self.mean, self.covariance, self.convert_coords(new_track.tlwh))
        self.state = TrackState.Tracked
        self.is_activated = True
        self.score = new_track.score
        self.cls = new_track.cls
        self.idx = new_track.idx

    def convert_coords(self, tlwh: np.ndarray) -> np.ndarray:
        """(left, top, width, height) -> (centre x, centre y, aspect, height)."""
        ret = np.asarray(tlwh).copy()
        ret[:2] += ret[2:] / 2
        ret[2] /= ret[3]
        return ret

    @property
    def tlwh(self) -> np.ndarray:
        if self.mean is None:
            return self._tlwh.copy()
        ret = self.mean[:4].copy()
        ret[2] *= ret[3]
        ret[:2] -= ret[2:] / 2
        return ret

    @property
    def xyxy(self) -> np.ndarray:
        ret = self.tlwh
        ret[2:] += ret[:2]
        return ret


def _no_id() -> int:
    raise RuntimeError("a detection takes its id from its tracker")


class BYTETracker:
    """ByteTrack over frames of one source (``args``: tracker.py's TrackerConfig)."""

    def __init__(self, args: Any) -> None:
        self.tracked_stracks: list[STrack] = []
        self.lost_stracks: list[STrack] = []
        self.removed_stracks: list[STrack] = []
        self.frame_id = 0
        self.args = args
        self.max_frames_lost = args.track_buffer
        self.kalman_filter = KalmanFilterXYAH()
        self._ids = iter(range(1, sys.maxsize))

    def multi_predict(self, tracks: list[STrack]) -> None:
        STrack.multi_predict(tracks)

    def update(self, results: Any) -> None:
        """Track the detections of the next frame (``conf``, ``cls``, ``xywh``, masks)."""
        self.frame_id += 1
        activated: list[STrack] = []
        refind: list[STrack] = []
        lost: list[STrack] = []
        removed: list[STrack] = []
        detections, detections_second = self._detections(results)
        unconfirmed = [t for t in self.tracked_stracks if not t.is_activated]
        tracked = [t for t in self.tracked_stracks if t.is_activated]
        pool = _joint(tracked, self.lost_stracks)
        self.multi_predict(pool)
        matches, u_track, u_detection = _assign(self._dists(pool, detections),
                                                self.args.match_thresh)
        for it, idet in matches:
            self._apply(pool[it], detections[idet], activated, refind)
        # the followed tracks left, to the low-score detections
        remaining = [pool[i] for i in u_track if pool[i].state == TrackState.Tracked]
        matches, u_remaining, _ = _assign(_iou_distance(remaining, detections_second), 0.5)
        for it, idet in matches:
            self._apply(remaining[it], detections_second[idet], activated, refind)
        for it in u_remaining:
            remaining[it].mark_lost()
            lost.append(remaining[it])
        # unconfirmed tracks (seen once) to the high-score detections left
        detections = [detections[i] for i in u_detection]
        matches, u_unconfirmed, u_detection = _assign(self._dists(unconfirmed, detections), 0.7)
        for it, idet in matches:
            unconfirmed[it].update(detections[idet], self.frame_id)
            activated.append(unconfirmed[it])
        for it in u_unconfirmed:
            unconfirmed[it].mark_removed()
            removed.append(unconfirmed[it])
        for inew in u_detection:
            track = detections[inew]
            if track.score >= self.args.new_track_thresh:
                track.activate(self.kalman_filter, self.frame_id)
                activated.append(track)
        for track in self.lost_stracks:
            if self.frame_id - track.end_frame > self.max_frames_lost:
                track.mark_removed()
                removed.append(track)
        self._merge(activated, refind, lost, removed)

    def _detections(self, results: Any) -> tuple[list[STrack], list[STrack]]:
        """The frame's (high-score, low-score) detections as new tracks; boxes without area
        are left out (the aspect ratio divides by the height)."""
        scores = np.asarray(results.conf)
        xywh = np.asarray(results.xywh)
        valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        high = valid & (scores >= self.args.track_high_thresh)
        low = valid & (scores > self.args.track_low_thresh) & (scores < self.args.track_high_thresh)
        out = []
        for mask in (high, low):
            tracks = []
            for i in np.flatnonzero(mask):
                track = STrack(np.r_[xywh[i], i], scores[i], results.cls[i])
                track.idx = i
                track.next_id = self._ids.__next__
                tracks.append(track)
            out.append(tracks)
        return out[0], out[1]

    def _dists(self, tracks: list[STrack], detections: list[STrack]) -> np.ndarray:
        dists = _iou_distance(tracks, detections)
        if self.args.fuse_score and dists.size:
            scores = np.array([d.score for d in detections])
            dists = 1 - (1 - dists) * scores[None, :]
        return dists

    def _apply(self, track: STrack, det: STrack, activated: list[STrack],
               refind: list[STrack]) -> None:
        if track.state == TrackState.Tracked:
            track.update(det, self.frame_id)
            activated.append(track)
        else:
            track.re_activate(det, self.frame_id, new_id=False)
            refind.append(track)

    def _merge(self, activated: list[STrack], refind: list[STrack], lost: list[STrack],
               removed: list[STrack]) -> None:
        """The frame's pools: followed, lost (without the found again and the removed), with
        near-identical tracks in both kept once, and the removed (the last 1000)."""
        tracked = [t for t in self.tracked_stracks if t.state == TrackState.Tracked]
        tracked = _joint(_joint(tracked, activated), refind)
        lost_pool = _sub(self.lost_stracks, tracked) + lost
        lost_pool = _sub(lost_pool, self.removed_stracks)
        self.tracked_stracks, self.lost_stracks = _remove_duplicates(tracked, lost_pool)
        self.removed_stracks.extend(removed)
        if len(self.removed_stracks) > 1000:
            self.removed_stracks = self.removed_stracks[-1000:]


def _joint(a: list[STrack], b: list[STrack]) -> list[STrack]:
    ids = {t.track_id for t in a}
    return a + [t for t in b if t.track_id not in ids]


def _sub(a: list[STrack], b: list[STrack]) -> list[STrack]:
    ids = {t.track_id for t in b}
    return [t for t in a if t.track_id not in ids]


def _remove_duplicates(a: list[STrack], b: list[STrack]) -> tuple[list[STrack], list[STrack]]:
    """Pairs of tracks over IoU 0.85: the shorter-lived one goes (from ``a`` on a tie)."""
    dist = _iou_distance(a, b)
    drop_a, drop_b = set(), set()
    for p, q in zip(*np.where(dist < 0.15), strict=True):
        if a[p].frame_id - a[p].start_frame > b[q].frame_id - b[q].start_frame:
            drop_b.add(q)
        else:
            drop_a.add(p)
    return ([t for i, t in enumerate(a) if i not in drop_a],
            [t for i, t in enumerate(b) if i not in drop_b])


def _iou_distance(a: list[STrack], b: list[STrack]) -> np.ndarray:
    """1 - IoU of every pair of boxes (float32, as the detector's boxes)."""
    if not a or not b:
        return np.ones((len(a), len(b)), np.float32)
    boxes_a = np.ascontiguousarray([t.xyxy for t in a], dtype=np.float32)
    boxes_b = np.ascontiguousarray([t.xyxy for t in b], dtype=np.float32)
    ax1, ay1, ax2, ay2 = boxes_a.T
    bx1, by1, bx2, by2 = boxes_b.T
    inter = ((np.minimum(ax2[:, None], bx2) - np.maximum(ax1[:, None], bx1)).clip(0)
             * (np.minimum(ay2[:, None], by2) - np.maximum(ay1[:, None], by1)).clip(0))
    union = (bx2 - bx1) * (by2 - by1) + ((ax2 - ax1) * (ay2 - ay1))[:, None] - inter
    return 1 - inter / (union + np.float32(1e-7))


def _assign(cost: np.ndarray, limit: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(matches, unmatched rows, unmatched columns) of the least-cost assignment in which a
    pair costs its entry and leaving a row or a column unmatched costs ``limit / 2`` (so no
    pair over ``limit`` is made): lapjv's ``extend_cost`` with ``cost_limit``."""
    rows, cols = cost.shape
    if cost.size == 0:
        return [], list(range(rows)), list(range(cols))
    n = rows + cols
    extended = np.full((n, n), limit / 2.0)
    extended[rows:, cols:] = 0
    extended[:rows, :cols] = cost
    r, c = linear_sum_assignment(extended)
    pick = dict(zip(r.tolist(), c.tolist(), strict=True))
    matches = [(i, pick[i]) for i in range(rows) if pick[i] < cols]
    matched_cols = {j for _, j in matches}
    return (matches, [i for i in range(rows) if pick[i] >= cols],
            [j for j in range(cols) if j not in matched_cols])
