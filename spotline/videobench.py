"""`spotline bench --video`: per-frame mode against track mode on the same clips, in one run.

Clips are folders with ``clip.mp4`` and a per-frame ``vlm.jsonl`` (``{"frame": k, "image":
"clip.mp4", "annotations": [{"caption", "bbox": [l, t, w, h]}]}``), as ``spotline data synth
--video`` writes them. Each frame is JPEG-encoded (as a producer publishes it) and answered by
both modes with the same stage objects; each clip is a source.

Figures per mode: frames/s, crops through the image tower per frame, per-frame accuracy (the
caption's box against the truth at IoU > 0.5), and caption flips per 100 frames (a caption's
box changing from one annotated object to another, or to or from a box that is none of them,
between consecutive frames; summed over captions). Per-frame mode also reports joint
assignment ("one box per caption") on the same scores. With ``absent`` > 0, every frame also
asks for captions that name objects not in the clip, and track mode with "not in view" is
judged with the scorer's own calibration (calibration.json beside it, fitted on stills of a
validation split, with its threshold) on every clip; a scorer without one gets a calibration
(with presence model and threshold) fitted on the first half of the clips' per-frame scores,
judged on the second half. Reported: precision and recall of the abstentions, and accuracy on
the captions in view with and without.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .common.errors import InputError
from .common.settings import Settings
from .evaluate import iou_ltwh
from .stages import calibration as calib
from .stages import runtime
from .stages.assign import assign
from .stages.collect import ltwh
from .stages.track import TrackOptions, options_from
from .trackmode import FrameAnswer, FrameModels, PerFrame, Tracked

BoxLTWH = tuple[float, float, float, float]
IOU_HIT = 0.5
JPEG_QUALITY = 90
# Targets of issue 13 (figures, never a test failure).
TARGET_CROPS_RATIO = 3.0
TARGET_FPS_RATIO = 2.0


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a clip: JPEG bytes, captions, and each caption's true box (None: absent)."""

    image: bytes
    captions: tuple[str, ...]
    truth: tuple[BoxLTWH | None, ...]


def load_clip(folder: str | Path, max_frames: int | None = None) -> list[VideoFrame]:
    """A clip folder's frames (decoded from the mp4, JPEG-encoded) with their truth."""
    folder = Path(folder)
    jsonl = folder / "vlm.jsonl"
    if not jsonl.is_file():
        raise InputError(f"{folder}: no vlm.jsonl (not a clip folder)")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: int(r["frame"]))
    if max_frames is not None:
        rows = rows[:max_frames]
    videos: dict[str, Any] = {}
    frames = []
    try:
        for row in rows:
            name = str(row["image"])
            cap = videos.get(name)
            if cap is None:
                cap = videos[name] = cv2.VideoCapture(str(folder / name))
            ok, bgr = cap.read()
            if not ok:
                raise InputError(f"{folder / name}: no frame {row['frame']}")
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            anns = row["annotations"]
            frames.append(VideoFrame(buf.tobytes(), tuple(str(a["caption"]) for a in anns),
                                     tuple(tuple(float(v) for v in a["bbox"])  # type: ignore
                                           for a in anns)))
    finally:
        for cap in videos.values():
            cap.release()
    return frames


def find_clips(root: str | Path) -> list[Path]:
    """Clip folders under ``root`` (or ``root`` itself), sorted."""
    root = Path(root)
    if (root / "vlm.jsonl").is_file():
        return [root]
    clips = sorted(p.parent for p in root.glob("*/vlm.jsonl"))
    if not clips:
        raise InputError(f"no clips under {root} (folders with clip.mp4 and vlm.jsonl)")
    return clips


def with_absent(frames: list[VideoFrame], vocabulary: Sequence[str], count: int,
                seed: int) -> list[VideoFrame]:
    """The clip with ``count`` captions added to every frame that name nothing in the clip."""
    if count <= 0:
        return frames
    present = {c for f in frames for c in f.captions}
    pool = sorted(set(vocabulary) - present)
    rng = np.random.default_rng(seed)
    extra = tuple(str(c) for c in rng.choice(pool, size=min(count, len(pool)), replace=False))
    return [VideoFrame(f.image, f.captions + extra, f.truth + (None,) * len(extra))
            for f in frames]


def iou_or_zero(a: BoxLTWH | None, b: BoxLTWH | None) -> float:
    """evaluate's IoU, 0 where either box is missing (not in view, or no answer)."""
    return 0.0 if a is None or b is None else iou_ltwh(a, b)


@dataclass
class Tally:
    """Figures of one mode over all clips."""

    frames: int = 0
    seconds: float = 0.0
    detections: int = 0  # frames the detector ran on
    crops: int = 0
    boxes: int = 0
    hits: int = 0
    asked: int = 0  # (frame, caption) pairs whose object is in view
    flips: int = 0
    abstained_right: int = 0  # absent caption, no box
    abstained_wrong: int = 0  # object in view, no box
    absent: int = 0

    def add(self, frame: VideoFrame, boxes: Sequence[BoxLTWH | None],
            previous: list[int] | None) -> list[int]:
        """Count one frame's answers; returns the object each caption's box is (see
        ``identity``), for the flips of the next frame."""
        ids = []
        for k, (truth, box) in enumerate(zip(frame.truth, boxes, strict=True)):
            if truth is None:
                self.absent += 1
                self.abstained_right += box is None
            else:
                self.asked += 1
                self.hits += iou_or_zero(box, truth) > IOU_HIT
                self.abstained_wrong += box is None
            ids.append(identity(box, frame))
            if previous is not None and truth is not None and previous[k] != ids[k]:
                self.flips += 1
        return ids

    def report(self) -> dict[str, float]:
        out = {"frames": self.frames, "frames_per_s": _div(self.frames, self.seconds),
               "crops_per_frame": _div(self.crops, self.frames),
               "detections_per_frame": _div(self.detections, self.frames),
               "boxes_per_frame": _div(self.boxes, self.frames),
               "accuracy": _div(self.hits, self.asked),
               "flips_per_100_frames": 100 * _div(self.flips, self.frames)}
        if self.absent:
            abstained = self.abstained_right + self.abstained_wrong
            out["abstain_precision"] = _div(self.abstained_right, abstained)
            out["abstain_recall"] = _div(self.abstained_right, self.absent)
        return out


def identity(box: BoxLTWH | None, frame: VideoFrame) -> int:
    """Which annotated object a box is (the one it overlaps at IoU > 0.5, best first); -1 for
    none, -2 for no box. A caption "flips" when this changes from one frame to the next."""
    if box is None:
        return -2
    overlaps = [iou_or_zero(box, t) for t in frame.truth]
    best = int(np.argmax(overlaps)) if overlaps else -1
    return best if best >= 0 and overlaps[best] > IOU_HIT else -1


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def run_modes(clips: list[tuple[str, list[VideoFrame]]],
              runners: dict[str, Any]) -> dict[str, Tally]:
    """Every frame of every clip through each mode in turn, frame by frame, so that the modes
    share the machine's load alike; a tally per mode (and ``<mode>+joint`` for a per-frame
    mode: joint assignment on the same scores)."""
    tallies = {name: Tally() for name in runners}
    for name, runner in runners.items():
        if isinstance(runner, PerFrame):
            tallies[name + "+joint"] = Tally()
    for clip, frames in clips:
        prev: dict[str, list[int] | None] = {name: None for name in tallies}
        for seq, frame in enumerate(frames):
            for name, runner in runners.items():
                fid = f"{clip}-{name}-{seq}"
                started = time.perf_counter()
                if isinstance(runner, PerFrame):
                    answer, scores, det_boxes = runner.frame_scored(fid, frame.image,
                                                                    frame.captions)
                else:
                    answer = runner.frame(clip, seq, fid, frame.image, frame.captions)
                tallies[name].seconds += time.perf_counter() - started
                prev[name] = _count(tallies[name], frame, answer.boxes, answer, prev[name])
                if isinstance(runner, PerFrame):
                    joint = name + "+joint"
                    boxes = _joint_boxes(scores, det_boxes, frame.captions)
                    prev[joint] = _count(tallies[joint], frame, boxes, answer, prev[joint])
    return tallies


def _count(tally: Tally, frame: VideoFrame, boxes: Sequence[BoxLTWH | None],
           answer: FrameAnswer, prev: list[int] | None) -> list[int]:
    tally.frames += 1
    tally.detections += answer.detected
    tally.crops += answer.crops_embedded
    tally.boxes += answer.boxes_found
    return tally.add(frame, boxes, prev)


def _joint_boxes(scores: np.ndarray, boxes: np.ndarray,
                 captions: Sequence[str]) -> list[BoxLTWH | None]:
    if len(boxes) == 0:
        return [None] * len(captions)
    return [ltwh(boxes[i]) for i in assign(scores, joint=True, captions=captions)]


ScoredFrame = tuple[np.ndarray, np.ndarray, VideoFrame]  # captions × boxes scores, xyxy boxes


def scored_frames(models: FrameModels,
                  clips: list[tuple[str, list[VideoFrame]]]) -> list[ScoredFrame]:
    """Per-frame scores and boxes of every frame of the clips."""
    runner = PerFrame(models)
    out = []
    for name, frames in clips:
        for seq, frame in enumerate(frames):
            _, matrix, boxes = runner.frame_scored(f"{name}-cal{seq}", frame.image,
                                                   frame.captions)
            out.append((matrix, boxes, frame))
    return out


def calibration_pairs(models: FrameModels,
                      clips: list[tuple[str, list[VideoFrame]]]) -> tuple[np.ndarray, np.ndarray]:
    """(score, right box?) for every caption × box of the clips, from per-frame scores."""
    return _pairs(scored_frames(models, clips))


def _pairs(scored: Sequence[ScoredFrame]) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    for matrix, boxes, frame in scored:
        for row, truth in enumerate(frame.truth):
            for b in range(len(boxes)):
                scores.append(float(matrix[row, b]))
                labels.append(float(iou_or_zero(ltwh(boxes[b]), truth) > IOU_HIT))
    return np.asarray(scores), np.asarray(labels)


def fit_on_clips(models: FrameModels,
                 clips: list[tuple[str, list[VideoFrame]]]) -> calib.Calibration:
    """A calibration fitted on the clips' per-frame scores, with a presence model and
    threshold when some captions name nothing in their clip."""
    scored = scored_frames(models, clips)
    cal = calib.fit(*_pairs(scored), "temperature")
    frames = [(m, f.captions, [t is not None for t in f.truth]) for m, _, f in scored]
    if any(t is None for _, _, f in scored for t in f.truth):
        cal = calib.fit_presence(cal, frames)
    return cal


def video_bench(settings: Settings, clips_dir: str | Path, max_clips: int = 4,
                max_frames: int = 60, options: TrackOptions | None = None, absent: int = 0,
                abstain_below: float | None = None, vocabulary: Sequence[str] = ()
                ) -> dict[str, Any]:
    """Both modes on the same clips; a JSON-friendly report."""
    # The settings' track mode (keyframes, IoU, evidence, joint), without abstaining: "not in
    # view" is measured on its own below.
    options = options or dataclasses.replace(options_from(settings), abstain_below=None)
    folders = find_clips(clips_dir)[:max_clips]
    clips = [(f.name, with_absent(load_clip(f, max_frames), vocabulary, absent, seed=i))
             for i, f in enumerate(folders)]
    models = FrameModels(settings)
    # Warm both paths once (lazy inits, caches) so neither mode pays for them in its time.
    PerFrame(models).frame("warm", clips[0][1][0].image, clips[0][1][0].captions)
    load_before = os.getloadavg()
    tallies = run_modes(clips, {"per-frame": PerFrame(models),
                                "track": Tracked(models, options)})
    load_after = os.getloadavg()
    per_frame, joint, tracked = (tallies["per-frame"], tallies["per-frame+joint"],
                                 tallies["track"])
    report: dict[str, Any] = {
        "clips": [name for name, _ in clips], "frames": per_frame.frames,
        "settings": {"imgsz": settings.imgsz, "tta": settings.tta, "upscale": settings.upscale,
                     "detector": settings.detector_weights, "scorer": settings.scorer_dir,
                     "keyframe_every": options.reuse.keyframe_every,
                     "detect_every": options.detect_every, "settle": options.settle,
                     "redetect_motion": options.motion,
                     "min_iou": options.reuse.min_iou, "decay": options.evidence.decay,
                     "switch_frames": options.evidence.switch_frames},
        "per_frame": per_frame.report(), "per_frame_joint": joint.report(),
        "track": tracked.report(),
        # the machine's 1-minute load average before and after the modes ran (others' work
        # slows both modes alike: they alternate frame by frame)
        "loadavg": [round(load_before[0], 2), round(load_after[0], 2)], "cpus": os.cpu_count()}
    pf, tr = report["per_frame"], report["track"]
    report["crops_ratio"] = _div(pf["crops_per_frame"], tr["crops_per_frame"])
    report["fps_ratio"] = _div(tr["frames_per_s"], pf["frames_per_s"])
    if absent > 0 and len(clips) >= 2:
        own = calib.load(runtime.resolve_weights(settings).scorer)
        report["not_in_view"] = _not_in_view(models, clips, options, abstain_below,
                                             own if own is not None and own.threshold is not None
                                             else None)
    return report


def _not_in_view(models: FrameModels, clips: list[tuple[str, list[VideoFrame]]],
                 options: TrackOptions, threshold: float | None,
                 own: calib.Calibration | None = None) -> dict[str, Any]:
    """Track mode with and without "not in view": with the scorer's own calibration on every
    clip, or else with one fitted on the first half of the clips, on the second half."""
    if own is not None:
        cal, fitted_on, held_out = own, "scorer's calibration.json", clips
    else:
        half = len(clips) // 2
        fitted_on, held_out = [n for n, _ in clips[:half]], clips[half:]
    out: dict[str, Any] = {"fitted_on_clips": fitted_on,
                           "held_out_clips": [n for n, _ in held_out]}
    if own is None:
        try:
            cal = fit_on_clips(models, clips[:half])
        except ValueError as exc:  # e.g. no right box at all among the fitting clips
            return {**out, "threshold": threshold, "error": f"cannot fit a calibration: {exc}"}
    threshold = threshold if threshold is not None else cal.threshold
    if threshold is None:
        return {**out, "threshold": None, "error": "the calibration has no threshold"}
    abstaining = dataclasses.replace(options, abstain_below=threshold)
    tallies = run_modes(held_out, {"with": Tracked(models, abstaining, calibration=cal),
                                   "without": Tracked(models, options)})
    with_cal, without = tallies["with"], tallies["without"]
    return {**out, "threshold": threshold,
            "calibration": {"temperature": cal.temperature, "bias": cal.bias,
                            "pairs": cal.fitted_on, "presence_model": cal.has_presence},
            "with": with_cal.report(), "without": without.report()}


def table(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    rows = [("per-frame", report["per_frame"]), ("per-frame + joint", report["per_frame_joint"]),
            ("track", report["track"])]
    lines = [f"video bench: {len(report['clips'])} clips, {report['frames']} frames each mode",
             f"{'mode':<20}{'frames/s':>10}{'crops/frame':>13}{'accuracy':>10}{'flips/100':>11}"
             f"{'detector runs/frame':>21}"]
    for name, r in rows:
        if not r:
            continue
        fps = f"{r['frames_per_s']:.2f}" if "frames_per_s" in r and r["frames_per_s"] else "—"
        lines.append(f"{name:<20}{fps:>10}{r['crops_per_frame']:>13.2f}"
                     f"{r['accuracy']:>10.3f}{r['flips_per_100_frames']:>11.1f}"
                     f"{r.get('detections_per_frame', 1.0):>21.2f}")
    lines.append(f"track mode: {report['crops_ratio']:.2f}x fewer crops per frame (target "
                 f"{TARGET_CROPS_RATIO:.0f}x), {report['fps_ratio']:.2f}x the frames/s (target "
                 f"{TARGET_FPS_RATIO:.0f}x)")
    if "loadavg" in report:
        lines.append(f"load average {report['loadavg'][0]} before, {report['loadavg'][1]} after "
                     f"({report['cpus']} cpus)")
    niv = report.get("not_in_view")
    if niv and "error" in niv:
        lines.append(f"not in view: {niv['error']}")
    if niv and "with" in niv:
        w = niv["with"]
        where = ("every clip, the scorer's calibration" if isinstance(niv["fitted_on_clips"], str)
                 else "held-out clips")
        lines.append(f"not in view (threshold {niv['threshold']:.3f}, {where}): abstain "
                     f"precision {w.get('abstain_precision', math.nan):.3f}, recall "
                     f"{w.get('abstain_recall', math.nan):.3f}; accuracy on visible captions "
                     f"{w['accuracy']:.3f} (without: {niv['without']['accuracy']:.3f})")
    return "\n".join(lines)
