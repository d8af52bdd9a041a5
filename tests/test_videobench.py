"""`spotline bench video` end to end on two small clips with the tiny models: both modes
answer every frame, the figures hang together, and "not in view" is evaluated held out."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from spotline.bench.video import (
    VideoFrame,
    find_clips,
    identity,
    load_clip,
    table,
    video_bench,
    with_absent,
)
from spotline.common.errors import InputError
from spotline.common.settings import Settings


def write_clip(folder: Path, seed: int, frames: int = 4, hidden_at: int = -1) -> Path:
    """Two coloured squares drifting over a grey background, in the synth --video layout; in
    frame ``hidden_at`` the red one is hidden (not drawn, "bbox": null, as --hide writes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0,
                             (256, 192))
    objs = [("red square", (40, 40, 220), 30, 40), ("blue square", (220, 80, 30), 150, 90)]
    lines = []
    for f in range(frames):
        img = np.full((192, 256, 3), 128, np.uint8) + rng.integers(0, 10, (192, 256, 3),
                                                                   dtype=np.uint8)
        anns = []
        for caption, bgr, x, y in objs:
            x, y = x + 2 * f, y + f
            if f == hidden_at and caption == "red square":
                anns.append({"caption": caption, "bbox": None})
                continue
            cv2.rectangle(img, (x, y), (x + 40, y + 30), bgr, -1)
            anns.append({"caption": caption, "bbox": [x, y, 41, 31]})
        writer.write(img)
        lines.append(json.dumps({"frame": f, "image": "clip.mp4", "annotations": anns}))
    writer.release()
    (folder / "vlm.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_clip_loading_and_absent_captions(tmp_path):
    write_clip(tmp_path / "clip_000", 0)
    write_clip(tmp_path / "clip_001", 1)
    assert [p.name for p in find_clips(tmp_path)] == ["clip_000", "clip_001"]
    frames = load_clip(tmp_path / "clip_000", max_frames=3)
    assert len(frames) == 3 and frames[1].truth[0] == (32.0, 41.0, 41.0, 31.0)
    assert cv2.imdecode(np.frombuffer(frames[0].image, np.uint8), cv2.IMREAD_COLOR).shape \
        == (192, 256, 3)
    extra = with_absent(frames, ["red square", "green star", "pink ring"], 1, seed=0)
    assert extra[0].captions[2] in ("green star", "pink ring")
    assert all(f.truth[2] is None and f.captions[2] == extra[0].captions[2] for f in extra)
    with pytest.raises(InputError, match="no clips"):
        find_clips(tmp_path / "clip_000" / "nothing")


def test_identity_of_a_box():
    frame = VideoFrame(b"", ("a", "b"), ((0, 0, 10, 10), (50, 50, 10, 10)))
    assert identity((1, 1, 10, 10), frame) == 0
    assert identity((49, 50, 10, 10), frame) == 1
    assert identity((20, 20, 10, 10), frame) == -1
    assert identity(None, frame) == -2


def test_video_bench_runs_both_modes(tmp_path, data_dir, redis_server):
    """Through the streaming pipeline (workers started as `spotline up` starts them, frames
    published by the client) and in process, on the same two clips."""
    for k in range(2):
        write_clip(tmp_path / f"clip_{k:03d}", k, frames=3, hidden_at=1 if k else -1)
    settings = Settings(data_dir=str(data_dir), imgsz=256, warmup=0, max_det=4, tta=False,
                        upscale=False, redis_url=redis_server.url)
    report = video_bench(settings, tmp_path, max_clips=2, max_frames=3, absent=1,
                         vocabulary=["green star", "pink ring", "black cross"],
                         in_process=True)
    assert report["frames"] == 6
    pipe = report["pipeline"]
    pf, tr = pipe["per_frame"], pipe["track"]
    assert pf["frames"] == tr["frames"] == 6 and pf["errors"] == tr["errors"] == 0
    # every box of every frame scored in per-frame mode; track mode embeds at most as many
    # (the tiny random detector's boxes, read from the workers' /metrics)
    assert pf["crops_per_frame"] == pf["boxes_per_frame"] > 0
    assert tr["boxes_per_frame"] > 0 and tr["crops_per_frame"] <= tr["boxes_per_frame"]
    assert pf["workers"] == 3 and tr["workers"] == 3  # detect, score, collect; detect, track,
    # collect
    assert set(tr["stages"]) == {"detect", "track", "collect"}
    assert tr["stages"]["track"]["entries"] == 6
    for r in (pf, tr):
        assert r["frames_per_s"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["flips_per_100_frames"] >= 0 and "abstain_recall" in r
    assert pf["abstain_recall"] == 0.0  # per-frame mode answers every caption with a box
    # the red square hidden in one frame: a caption not in view, counted on its own too
    assert pf["hidden"] == tr["hidden"] == 1 and pf["hidden_no_box"] == 0
    assert 0 <= tr["hidden_no_box"] <= 1
    local = report["in_process"]
    lpf, ltr, joint = local["per_frame"], local["track"], local["per_frame_joint"]
    assert lpf["frames"] == ltr["frames"] == joint["frames"] == 6
    assert lpf["crops_per_frame"] == lpf["boxes_per_frame"] == ltr["boxes_per_frame"]
    assert ltr["crops_per_frame"] <= lpf["crops_per_frame"]
    niv = local["not_in_view"]
    assert niv["fitted_on_clips"] == ["clip_000"] and niv["held_out_clips"] == ["clip_001"]
    assert "with" in niv or "error" in niv
    text = table(report)
    assert text.index("through the streaming pipeline") < text.index("in-process")
    assert "track mode:" in text and "in-process track mode:" in text
    assert "hidden: no box" in text and "0 of 1" in text
