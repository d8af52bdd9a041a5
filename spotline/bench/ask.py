"""Ask the past, measured (docs/ask.md): ``python -m spotline.bench.ask``.

- ``speed``: a source's memory of ``minutes`` at ``fps`` with ``tracks`` tracks in view,
  written through the recorder the track stage uses, then the time of an answer over all of
  it (Redis read, decode, one matrix product, calibration, boxes); and the memory it takes
  per source-minute. The demo models' embedding size answers with the demo scorer itself
  (the caption's text embedding cached after the first question, as a gateway keeps it); a
  larger size (1,024: SigLIP-large) with random unit vectors and a random text vector.
- ``accuracy``: clips that training never saw (``spotline data synth --video --seed 29``)
  through the track stage with the demo models, each caption asked after its clip ended: is
  the best track the one the truth boxes follow (IoU > 0.5 in most of the caption's visible
  frames)? And captions naming nothing in the clip: is the answer "not seen"?
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..common.envelope import Envelope
from ..common.settings import Settings
from ..common.trackmemory import MemoryStore
from ..common.transport import Transport
from ..stages import memory

IOU_HIT = 0.5


def fill(store: MemoryStore, source: str, dim: int, minutes: float = 10.0, fps: float = 10.0,
         tracks: int = 4, every_s: float = 1.0, precision: str = "int8",
         start: float = 1_000_000.0) -> dict[str, float]:
    """A source's memory as the track stage would keep it: ``tracks`` tracks moving in view,
    each embedded on every frame (its embedding kept every ``every_s``); a track leaves and
    a new one comes every 30 s. Returns the memory's stats."""
    rng = np.random.default_rng(dim)
    recorder = memory.Recorder(store, precision, every_s)
    frames = int(minutes * 60 * fps)
    for k in range(frames):
        t = start + k / fps
        ids = np.arange(tracks) + 1 + tracks * (int(t - start) // 30)
        x = (k % 300) * 2.0
        boxes = np.array([[x + 40 * i, 20 * i, x + 40 * i + 30, 20 * i + 30]
                          for i in range(tracks)], np.float32)
        vecs = rng.normal(size=(tracks, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        recorder.record(source, k + 1, t, boxes, ids, dict(zip(ids.tolist(), vecs, strict=True)))
    return store.stats(source)


def speed(settings: Settings, dim: int | None = None, minutes: float = 10.0, fps: float = 10.0,
          tracks: int = 4, repeats: int = 5, precision: str = "int8") -> dict[str, Any]:
    """The time of an answer over ``minutes`` of one source (ms, median and max of
    ``repeats``) and its memory per source-minute. ``dim`` None: the demo scorer's size,
    answered by the demo scorer; else random vectors of that size."""
    from ..results.ask import Asker

    t = Transport(settings)
    store = MemoryStore(t, retention_s=minutes * 60 + 60, max_bytes=1 << 40)
    scorer = None
    if dim is not None:
        rng = np.random.default_rng(1)
        text = rng.normal(size=dim).astype(np.float32)
        text /= np.linalg.norm(text)

        def scorer(caption: str, embeds: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-(embeds @ text * 10.0 - 5.0)))

    asker = Asker(settings, t, scorer=scorer)
    if dim is None:
        asker._load()  # the demo scorer; its size from one image embedding
        dim = len(asker_dim(settings))
    source = f"bench-ask-{dim}-{precision}"
    stats = fill(store, source, dim, minutes, fps, tracks, settings.ask_embed_every_s, precision)
    end = stats["newest"] + 1
    times = []
    answer = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        answer = asker.ask("red star", [source], since_s=minutes * 60 + 1, now=end)
        times.append((time.perf_counter() - t0) * 1000)
    assert answer is not None
    t.close()
    return {"dim": dim, "minutes": minutes, "fps": fps, "tracks": tracks,
            "precision": precision, "frames": stats["records"],
            "embeddings": answer.searched[source]["embeddings"],
            "answer_ms_median": round(statistics.median(times), 1),
            "answer_ms_max": round(max(times), 1),
            "bytes": stats["bytes"],
            "bytes_per_source_minute": round(stats["bytes"] / minutes)}


def asker_dim(settings: Settings) -> np.ndarray:
    """One image embedding of the demo scorer (for its size)."""
    from ..stages.score import Score

    score = Score(settings.replace(tracking=False))
    score.setup()
    return score.image_array([np.zeros((32, 32, 3), np.uint8)])[0]


def _iou(a: np.ndarray, b: tuple[float, ...]) -> float:
    """IoU of an xyxy box and an ltwh box."""
    bx = (b[0], b[1], b[0] + b[2], b[1] + b[3])
    w = max(0.0, min(a[2], bx[2]) - max(a[0], bx[0]))
    h = max(0.0, min(a[3], bx[3]) - max(a[1], bx[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def track_clip(settings: Settings, source: str, frames: list[Any], start: float,
               fps: float = 10.0) -> None:
    """A clip through detect and the track stage in this process, as the workers run them."""
    from ..stages.detect import Detect
    from ..stages.track import Track

    detect, track = Detect(settings), Track(settings)
    for k, f in enumerate(frames, start=1):
        env = Envelope(frame_id=f"{source}-{k}", source_id=source, captions=f.captions,
                       image=f.image, seq=k, capture_time=start + k / fps)
        (_, det), = detect.process([env])
        track.process([det])


def accuracy(settings: Settings, clips_dir: str | Path, max_clips: int = 8,
             absent: int = 3) -> dict[str, Any]:
    """Per clip, each caption asked after the clip ended (see the module doc)."""
    from ..results.ask import Asker
    from .video import find_clips, load_clip

    asker = Asker(settings)
    clips = []
    for n, folder in enumerate(find_clips(clips_dir)[:max_clips]):
        frames = load_clip(folder)
        source = f"acc-{n}-{int(time.time() * 1000)}"
        start = 1_000_000.0 + n * 10_000
        track_clip(settings, source, frames, start)
        clips.append((folder.name, source, frames, start + len(frames) / 10.0 + 1))
    return ask_clips(asker, clips, absent)


def ask_clips(asker: Any, clips: list[tuple[str, str, list[Any], float]],
              absent: int = 3) -> dict[str, Any]:
    """Each caption of each tracked clip asked after its end; ``absent`` captions naming
    nothing in the clip too."""
    from ..data.synth import all_captions

    hits = asked = 0
    not_seen_right = not_seen_said = absent_asked = absent_right = 0
    misses = []
    vocabulary = all_captions()
    for n, (name, source, frames, end) in enumerate(clips):
        present = list(dict.fromkeys(c for f in frames for c in f.captions))
        for caption in present:
            ans = asker.ask(caption, [source], since_s=3600, now=end)
            visible = [(k, f.truth[f.captions.index(caption)]) for k, f in enumerate(frames, 1)
                       if caption in f.captions and f.truth[f.captions.index(caption)]]
            if not visible:
                continue
            asked += 1
            not_seen_said += not ans.seen
            if not ans.seen:
                misses.append((name, caption, "not seen"))
                continue
            boxes = {b[0]: np.array(b[2:]) for b in ans.matches[0].boxes}
            good = sum(k in boxes and _iou(boxes[k], truth) > IOU_HIT for k, truth in visible)
            if good > len(visible) / 2:
                hits += 1
            else:
                misses.append((name, caption, f"{good}/{len(visible)} frames"))
        pool = sorted(set(vocabulary) - set(present))
        for caption in pool[n % 7::max(1, len(pool) // absent)][:absent]:
            ans = asker.ask(caption, [source], since_s=3600, now=end)
            absent_asked += 1
            absent_right += not ans.seen
            not_seen_said += not ans.seen
            not_seen_right += not ans.seen
    return {"clips": len(clips), "captions": asked,
            "best_track_right": round(hits / asked, 3) if asked else None,
            "absent_captions": absent_asked,
            "absent_answered_not_seen": round(absent_right / absent_asked, 3)
            if absent_asked else None,
            "not_seen_precision": round(not_seen_right / not_seen_said, 3)
            if not_seen_said else None,
            "misses": misses}


def main(argv: list[str] | None = None) -> None:
    from ..common.settings import load_settings
    from ..train.demo import apply_demo_models

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", help="clip folders (spotline data synth DIR --video --seed 29)")
    p.add_argument("--max-clips", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--tracks", type=int, default=4)
    p.add_argument("--dims", default="demo,1024")
    p.add_argument("--repeats", type=int, default=5, help="answers timed per size and precision")
    a = p.parse_args(argv)
    from .probes import end_load, probe_cpu, probe_lines

    probe = probe_cpu()
    for line in probe_lines(probe):
        print(line, flush=True)
    s = apply_demo_models(load_settings()).replace(tracking=True)
    from ..common.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        s = s.replace(redis_url=server.url)
        out: dict[str, Any] = {"speed": []}
        for d in a.dims.split(","):
            for precision in ("int8", "float16"):
                out["speed"].append(speed(s, None if d == "demo" else int(d), a.minutes, a.fps,
                                          a.tracks, a.repeats, precision=precision))
                print(json.dumps(out["speed"][-1]), flush=True)
        if a.clips:
            out["accuracy"] = accuracy(s, a.clips, a.max_clips)
            print(json.dumps(out["accuracy"]), flush=True)
    print(end_load(probe), flush=True)


if __name__ == "__main__":
    main()
