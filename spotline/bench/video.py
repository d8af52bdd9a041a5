"""`spotline bench video`: per-frame mode against track mode on the same clips, in one run.

Clips are folders with ``clip.mp4`` and a per-frame ``vlm.jsonl`` (``{"frame": k, "image":
"clip.mp4", "annotations": [{"caption", "bbox": [l, t, w, h]}]}``; ``"bbox": null``: the
caption's object is hidden in that frame, as ``--hide`` makes them), as ``spotline data synth
--video`` writes them. Each frame is JPEG-encoded (as a producer publishes it); each clip is a
source.

The headline figures come from the streaming pipeline (``pipeline_mode``): for each mode in
turn, Redis and one worker process per stage as `spotline up` starts them, the frames
published by the client, the results read back; track mode is ``tracking=true`` with the
settings as given ("not in view" auto: abstaining with the scorer's calibration). Optionally
(``in_process``) both modes also run in this process on the same stage objects, alternating
frame by frame: those figures are labelled "in-process".

Figures per mode: frames/s, crops through the image tower per frame, per-frame accuracy (the
caption's box against the truth at IoU > 0.5), and caption flips per 100 frames (a caption's
box changing from one annotated object to another, or to or from a box that is none of them,
between consecutive frames; summed over captions). With ``absent`` > 0, every frame also asks
for captions that name objects not in the clip: precision and recall of the "no box"
answers; a target while hidden counts there too (its right answer is no box as well), and on
its own as "hidden answered no box". In process, per-frame mode also reports joint assignment
("one box per caption") on the same scores, and "not in view" is judged with the scorer's own
calibration (calibration.json beside it, with its threshold) on every clip; a scorer without one
gets a calibration fitted on the first half of the clips' per-frame scores, judged on the second
half.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.eval import iou_ltwh
from spotline.pipeline.trackmode import FrameAnswer, FrameModels, PerFrame, Tracked
from spotline.stages import runtime
from spotline.stages.collect import ltwh
from spotline.stages.track import options_from
from spotline.stages.tracking import calibration as calib
from spotline.stages.tracking.assign import assign
from spotline.stages.tracking.source import TrackOptions

BoxLTWH = tuple[float, float, float, float]
IOU_HIT = 0.5
JPEG_QUALITY = 90
# Targets of track mode (figures, never a test failure).
TARGET_CROPS_RATIO = 3.0
TARGET_FPS_RATIO = 2.0


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a clip: JPEG bytes, captions, and each caption's true box (None: not in
    view: a caption naming nothing in the clip, or, where ``hidden`` says so, its object
    hidden in this frame)."""

    image: bytes
    captions: tuple[str, ...]
    truth: tuple[BoxLTWH | None, ...]
    hidden: tuple[bool, ...] = ()  # per caption: its object is in the clip, hidden here


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
            frames.append(VideoFrame(
                buf.tobytes(), tuple(str(a["caption"]) for a in anns),
                tuple(None if a["bbox"] is None else tuple(float(v) for v in a["bbox"])
                      for a in anns),  # type: ignore[misc]
                tuple(a["bbox"] is None for a in anns)))
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
    return [VideoFrame(f.image, f.captions + extra, f.truth + (None,) * len(extra),
                       _hidden_flags(f) + (False,) * len(extra)) for f in frames]


def _hidden_flags(frame: VideoFrame) -> tuple[bool, ...]:
    return frame.hidden or (False,) * len(frame.captions)


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
    abstained_right: int = 0  # absent caption or hidden object, no box
    abstained_wrong: int = 0  # object in view, no box
    absent: int = 0  # captions not in view: naming nothing in the clip, or hidden objects
    hidden: int = 0  # of those, objects of the clip hidden in the frame
    hidden_no_box: int = 0  # ... answered with no box

    def add(self, frame: VideoFrame, boxes: Sequence[BoxLTWH | None],
            previous: list[int | None] | None) -> list[int | None]:
        """Count one frame's answers; returns the object each caption's box is (see
        ``identity``; None where the caption's object is not in view), for the flips of the
        next frame (a caption flips between two frames where its object is in view: no box
        while it is hidden, then its box again, is no flip)."""
        ids: list[int | None] = []
        hidden = _hidden_flags(frame)
        for k, (truth, box) in enumerate(zip(frame.truth, boxes, strict=True)):
            if truth is None:
                self.absent += 1
                self.abstained_right += box is None
                self.hidden += hidden[k]
                self.hidden_no_box += hidden[k] and box is None
            else:
                self.asked += 1
                self.hits += iou_or_zero(box, truth) > IOU_HIT
                self.abstained_wrong += box is None
            ids.append(None if truth is None else identity(box, frame))
            if previous is not None and None not in (previous[k], ids[k]) \
                    and previous[k] != ids[k]:
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
        if self.hidden:
            out["hidden"] = self.hidden
            out["hidden_no_box"] = self.hidden_no_box
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
        prev: dict[str, list[int | None] | None] = {name: None for name in tallies}
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
           answer: FrameAnswer, prev: list[int | None] | None) -> list[int | None]:
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


def track_presence(models: FrameModels, clips: list[tuple[str, list[VideoFrame]]],
                   options: TrackOptions, calibration: calib.Calibration
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track mode over the clips (the track stage's own step): each caption's presence (P in
    view, of its posteriors) on every frame, whether track mode held it back there whatever the
    threshold (waiting for its lost track, or no box at all), and whether its object was in
    view. Two runs alike but for abstaining: in the first every caption abstains, so that its
    answer carries its presence; in the second only the held ones do. Abstaining changes no
    tracking, embedding or evidence, only which captions share the joint assignment."""
    answers = {}
    for name, below in (("presence", math.inf), ("held", 0.0)):
        tracked = Tracked(models, dataclasses.replace(options, abstain_below=below),
                          calibration=calibration)
        answers[name] = [tracked.frame(clip, seq, f"{clip}-{name}-{seq}", f.image, f.captions)
                         for clip, frames in clips for seq, f in enumerate(frames)]
    presence, held, present = [], [], []
    flat = [f for _, frames in clips for f in frames]
    for frame, every, some in zip(flat, answers["presence"], answers["held"], strict=True):
        presence += [0.0 if math.isnan(p) else p for p in every.scores]
        held += [box is None for box in some.boxes]
        present += [t is not None for t in frame.truth]
    return np.asarray(presence), np.asarray(held), np.asarray(present)


def fit_track_threshold(settings: Settings, clips_dir: str | Path, absent: int = 1,
                        target_precision: float = calib.TARGET_PRECISION,
                        vocabulary: Sequence[str] = ()) -> tuple[calib.Calibration, Path]:
    """Track mode's "not in view" threshold fitted on the clips under ``clips_dir`` (with
    ``absent`` captions a frame naming nothing in the clip, and any hidden targets) and written
    into the scorer's calibration.json, whose presence model it uses."""
    scorer_dir = runtime.resolve_weights(settings).scorer
    cal = calib.load(scorer_dir)
    if cal is None or not cal.has_presence:
        raise InputError(f"{scorer_dir}: no calibration with a presence model to fit track "
                         "mode's threshold on (`spotline calibrate DATASET --absent 1` first)")
    clips = [(f.name, with_absent(load_clip(f), vocabulary, absent, seed=i))
             for i, f in enumerate(find_clips(clips_dir))]
    models = FrameModels(settings)
    presence, held, present = track_presence(models, clips, options_from(settings), cal)
    threshold, how = calib.choose_track_threshold(presence, held, present, target_precision)
    cal = dataclasses.replace(cal, track_threshold=threshold, track_threshold_fit={
        **how, "clips": len(clips), "frames": sum(len(f) for _, f in clips),
        "absent_per_frame": absent})
    return cal, calib.save(cal, scorer_dir)


def video_bench(settings: Settings, clips_dir: str | Path, max_clips: int = 4,
                max_frames: int = 60, options: TrackOptions | None = None, absent: int = 0,
                abstain_below: float | None = None, vocabulary: Sequence[str] = (),
                pipeline: bool = True, in_process: bool = False) -> dict[str, Any]:
    """Both modes on the same clips; a JSON-friendly report. ``pipeline``: through the
    streaming pipeline (``pipeline_mode``, per-frame mode then track mode with the settings'
    track options and "not in view"); ``in_process``: also both modes in this process
    (``in_process_bench``), under ``in_process``."""
    folders = find_clips(clips_dir)[:max_clips]
    clips = [(f.name, with_absent(load_clip(f, max_frames), vocabulary, absent, seed=i))
             for i, f in enumerate(folders)]
    report: dict[str, Any] = {
        "clips": [name for name, _ in clips], "frames": sum(len(f) for _, f in clips),
        "settings": {"imgsz": settings.imgsz, "tta": settings.tta, "upscale": settings.upscale,
                     "detector": settings.detector_weights, "scorer": settings.scorer_dir,
                     "not_in_view": settings.not_in_view,
                     "detect_every": settings.track_detect_every,
                     "keyframe_every": settings.track_keyframe_every},
        "cpus": os.cpu_count(), "absent_per_frame": absent}
    load_before = os.getloadavg()
    if pipeline:
        per_frame = pipeline_mode(settings, clips, tracking=False)
        track = pipeline_mode(settings, clips, tracking=True)
        report["pipeline"] = {"per_frame": per_frame, "track": track,
                              "crops_ratio": _div(per_frame["crops_per_frame"],
                                                  track["crops_per_frame"]),
                              "fps_ratio": _div(track["frames_per_s"],
                                                per_frame["frames_per_s"])}
    if in_process:
        report["in_process"] = in_process_bench(settings, clips, options, absent,
                                                abstain_below)
    load_after = os.getloadavg()
    # the machine's load averages (1, 5, 15 min) before and after: others' work slows a run
    report["loadavg"] = [[round(v, 2) for v in load_before], [round(v, 2) for v in load_after]]
    return report


def in_process_bench(settings: Settings, clips: list[tuple[str, list[VideoFrame]]],
                     options: TrackOptions | None = None, absent: int = 0,
                     abstain_below: float | None = None) -> dict[str, Any]:
    """Both modes in this process with the same stage objects (track mode: the track stage's
    own step, spotline/pipeline/trackmode.py), alternating frame by frame so that the machine's load
    weighs on both alike; "not in view" measured on its own."""
    # The settings' track mode (keyframes, IoU, evidence, joint), without abstaining: "not in
    # view" is measured on its own below.
    options = options or dataclasses.replace(options_from(settings), abstain_below=None)
    models = FrameModels(settings)
    # Warm both paths once (lazy inits, caches) so neither mode pays for them in its time.
    PerFrame(models).frame("warm", clips[0][1][0].image, clips[0][1][0].captions)
    tallies = run_modes(clips, {"per-frame": PerFrame(models),
                                "track": Tracked(models, options)})
    report: dict[str, Any] = {"per_frame": tallies["per-frame"].report(),
                              "per_frame_joint": tallies["per-frame+joint"].report(),
                              "track": tallies["track"].report(),
                              "options": {"keyframe_every": options.reuse.keyframe_every,
                                          "detect_every": options.detect_every,
                                          "settle": options.settle,
                                          "redetect_motion": options.motion,
                                          "min_iou": options.reuse.min_iou,
                                          "decay": options.evidence.decay,
                                          "switch_frames": options.evidence.switch_frames}}
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
    if threshold is None:
        threshold = cal.tracked_threshold
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


# --- through the streaming pipeline ----------------------------------------------------------
PIPELINE_TIMEOUT_S = 900.0
# the workers' series the bench reads besides the stage phases (crops through the image tower)
_SERIES = {"spotline_crops_per_frame": (), "spotline_track_crops": ("outcome",),
           "spotline_track_boxes": ("by",), "spotline_track_frames": ("outcome",)}


def pipeline_mode(settings: Settings, clips: list[tuple[str, list[VideoFrame]]],
                  tracking: bool, timeout_s: float = PIPELINE_TIMEOUT_S) -> dict[str, Any]:
    """One mode through the streaming pipeline, as users run it: Redis (embedded unless the
    settings give a URL) and one worker process per stage started by ``LocalPipeline`` (the
    supervisor `spotline up` uses), every clip's frames published by the client (``Client
    .publish``, each clip a source, the clips' frames interleaved as concurrent feeds send
    them), every result read back. Frames/s: first publish to last result. Crops per frame
    and detector runs from the workers' /metrics."""
    from spotline.bench.probes import delta, free_port_block, scrape, stage_phases
    from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
    from spotline.producer.client import Client

    level = settings.log_level if settings.log_level.upper() == "DEBUG" else "ERROR"
    s = settings.replace(tracking=tracking, namespace=f"video{uuid.uuid4().hex[:8]}",
                         log_level=level)
    stages = pipeline_stages(s)
    s = s.replace(metrics_port=free_port_block(len(stages)))
    pipe = LocalPipeline(s, metrics=True, ready_timeout=timeout_s)
    with pipe as url:
        assert pipe.supervisor is not None
        ports = [c.metrics_port for c in pipe.supervisor.children if c.metrics_port]
        client = Client.connect(url, s)
        try:
            # every worker warmed (lazy inits) on a source of its own, outside the timing
            first = clips[0][1][0]
            client.await_result(client.publish(first.image, first.captions, source_id="warm"),
                                timeout=timeout_s)
            before = _series(ports) | scrape(ports)
            load_before = os.getloadavg()
            started = time.time()
            ids: dict[str, tuple[int, int]] = {}
            for k in range(max(len(frames) for _, frames in clips)):
                for c, (name, frames) in enumerate(clips):
                    if k < len(frames):
                        ids[client.publish(frames[k].image, frames[k].captions,
                                           source_id=name)] = (c, k)
            got = client.await_results(list(ids), timeout=timeout_s)
            load_after = os.getloadavg()
            during = delta(_series(ports) | scrape(ports), before)
        finally:
            client.close()
    tally = Tally(seconds=max(r.finished_time for r in got.values()) - started)
    by_frame = {ids[f]: r for f, r in got.items()}
    for c, (_, frames) in enumerate(clips):
        prev = None
        for k, frame in enumerate(frames):
            r = by_frame[(c, k)]
            absent = r.absent or (False,) * len(r.boxes)
            tally.frames += 1
            prev = tally.add(frame, [None if gone else box
                                     for box, gone in zip(r.boxes, absent, strict=True)], prev)
    if tracking:
        tally.crops = int(during.get("track_crops_total|embedded", 0.0))
        tally.boxes = tally.crops + int(during.get("track_crops_total|reused", 0.0))
        tally.detections = tally.frames - int(during.get("track_boxes_total|look", 0.0))
    else:
        tally.crops = tally.boxes = int(during.get("crops_per_frame_sum", 0.0))
        tally.detections = tally.frames
    extra = {}
    if tracking:  # where a tracked frame's boxes came from (the profile of the track stage)
        extra["boxes_from"] = {by: int(during.get(f"track_boxes_total|{by}", 0.0))
                               for by in ("detect", "track", "look")}
    return {**tally.report(), **extra, "errors": sum(r.error is not None for r in got.values()),
            "stages": stage_phases(during, stages), "workers": len(ports),
            "loadavg": [round(load_before[0], 2), round(load_after[0], 2)]}


def _series(ports: Sequence[int]) -> dict[str, float]:
    """The ``_SERIES`` summed over the workers' /metrics, keyed ``name|label``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            labels = _SERIES.get(family.name)
            if labels is None:
                continue
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue
                key = "|".join([sample.name.removeprefix("spotline_"),
                                *[sample.labels.get(k, "") for k in labels]])
                totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals


def table(report: dict[str, Any]) -> str:
    """The report as a few readable lines: the pipeline's figures first, then the in-process
    ones (labelled so)."""
    lines = [f"video bench: {len(report['clips'])} clips, {report['frames']} frames per mode"]
    if report.get("real_size"):
        lines.append("real-size random architectures at the seed's settings: frames/s and "
                     "crops/frame are what the modes cost; accuracy, flips and abstention "
                     "mean nothing with random weights")
    header = (f"{'mode':<28}{'frames/s':>10}{'crops/frame':>13}{'accuracy':>10}"
              f"{'flips/100':>11}{'detector runs/frame':>21}{'abstain P/R':>14}"
              f"{'hidden: no box':>16}")
    pipe = report.get("pipeline")
    if pipe:
        lines += ["through the streaming pipeline (spotline up's workers, frames published by "
                  "the client):", header]
        lines += [_row(f"per-frame{_load(pipe['per_frame'])}", pipe["per_frame"]),
                  _row(f"track{_load(pipe['track'])}", pipe["track"]),
                  _ratios("track mode", pipe)]
    local = report.get("in_process")
    if local:
        lines += ["in-process (one process, the same stage code, modes alternating frame by "
                  "frame):", header]
        lines += [_row("per-frame", local["per_frame"]),
                  _row("per-frame + joint", local["per_frame_joint"]),
                  _row("track", local["track"]), _ratios("in-process track mode", local)]
        lines += _not_in_view_lines(local.get("not_in_view"))
    if "loadavg" in report:
        before, after = report["loadavg"]
        lines.append(f"load average (1/5/15 min) {before} before, {after} after "
                     f"({report['cpus']} cpus)")
    return "\n".join(lines)


def _load(r: dict[str, Any]) -> str:
    return f" (load {r['loadavg'][0]}-{r['loadavg'][1]})" if "loadavg" in r else ""


def _row(name: str, r: dict[str, Any]) -> str:
    fps = f"{r['frames_per_s']:.2f}" if r.get("frames_per_s") else "—"
    nv = (f"{r['abstain_precision']:.2f}/{r['abstain_recall']:.2f}"
          if "abstain_recall" in r else "—")
    hidden = f"{r['hidden_no_box']} of {r['hidden']}" if r.get("hidden") else "—"
    return (f"{name:<28}{fps:>10}{r['crops_per_frame']:>13.2f}{r['accuracy']:>10.3f}"
            f"{r['flips_per_100_frames']:>11.1f}{r.get('detections_per_frame', 1.0):>21.2f}"
            f"{nv:>14}{hidden:>16}")


def _ratios(what: str, r: dict[str, Any]) -> str:
    return (f"{what}: {r['crops_ratio']:.2f}x fewer crops per frame (target "
            f"{TARGET_CROPS_RATIO:.0f}x), {r['fps_ratio']:.2f}x the frames/s (target "
            f"{TARGET_FPS_RATIO:.0f}x)")


def _not_in_view_lines(niv: dict[str, Any] | None) -> list[str]:
    if niv and "error" in niv:
        return [f"in-process not in view: {niv['error']}"]
    if not niv or "with" not in niv:
        return []
    w = niv["with"]
    where = ("every clip, the scorer's calibration" if isinstance(niv["fitted_on_clips"], str)
             else "held-out clips")
    return [f"in-process not in view (threshold {niv['threshold']:.3f}, {where}): abstain "
            f"precision {w.get('abstain_precision', math.nan):.3f}, recall "
            f"{w.get('abstain_recall', math.nan):.3f}; accuracy on visible captions "
            f"{w['accuracy']:.3f} (without: {niv['without']['accuracy']:.3f})"]
