"""Targets hidden for a few frames in the synthetic clips (``spotline data synth --video
--hide P``): where they are, that their truth there is "no box", that the clips stay what they
were without the option, and that the video bench counts a hidden target answered with no box
as a right abstention."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from spotline.bench.video import Tally, load_clip, table, with_absent
from spotline.data import synth
from spotline.data.video import HIDDEN_FRAMES, hidden_spans, write_clips

SIZE = (192, 128)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "vlm.jsonl").read_text().splitlines()]


def _clips(out: Path, hide: float, frames: int = 14) -> list[Path]:
    options = synth.SynthOptions(seed=5, images=1, size=SIZE, sides=(14, 30))
    return write_clips(out, options, 2, frames, hide)


def test_hidden_spans_are_deterministic_and_in_bounds():
    spans = hidden_spans(31, 0, 40, 60, 0.5)
    assert spans == hidden_spans(31, 0, 40, 60, 0.5)  # same seed, same spans
    assert spans != hidden_spans(31, 1, 40, 60, 0.5)  # another clip, others
    chosen = [s for s in spans if len(s)]
    assert 0 < len(chosen) < 40
    lo, hi = HIDDEN_FRAMES
    # 3 to 6 frames in a row, seen before and after
    assert all(lo <= len(s) <= hi and s.start >= 1 and s.stop <= 59 for s in chosen)
    assert all(len(s) for s in hidden_spans(31, 0, 10, 60, 1.0))
    assert not any(len(s) for s in hidden_spans(31, 0, 10, 60, 0.0))
    assert not any(len(s) for s in hidden_spans(31, 0, 10, 4, 1.0))  # too short to hide in


def test_hidden_targets_in_the_clips(tmp_path: Path):
    plain = _clips(tmp_path / "plain", 0.0)
    again = write_clips(tmp_path / "default", synth.SynthOptions(seed=5, images=1, size=SIZE,
                                                                 sides=(14, 30)), 2, 14)
    hidden = _clips(tmp_path / "hidden", 1.0)
    twice = _clips(tmp_path / "twice", 1.0)
    for a, b, h, h2 in zip(plain, again, hidden, twice, strict=True):
        # without --hide the clip is what it was (byte for byte); with it, deterministic
        for name in ("clip.mp4", "vlm.jsonl"):
            assert (a / name).read_bytes() == (b / name).read_bytes()
            assert (h / name).read_bytes() == (h2 / name).read_bytes()
        rows, hid = _rows(a), _rows(h)
        objects = len(rows[0]["annotations"])
        nulls = {(r["frame"], k) for r in hid for k, ann in enumerate(r["annotations"])
                 if ann["bbox"] is None}
        # every object hidden once (hide 1.0), for 3-6 frames in a row, never first or last
        for k in range(objects):
            frames = sorted(f for f, j in nulls if j == k)
            assert 3 <= len(frames) <= 6 and frames == list(range(frames[0], frames[-1] + 1))
            assert 0 < frames[0] and frames[-1] < len(rows) - 1
        # the same objects, captions and boxes, but for the hidden frames' "bbox": null
        for r, q in zip(rows, hid, strict=True):
            for k, (ann, got) in enumerate(zip(r["annotations"], q["annotations"],
                                               strict=True)):
                assert got["caption"] == ann["caption"]
                assert got["bbox"] == (None if (r["frame"], k) in nulls else ann["bbox"])


def test_the_cli_hides_targets(tmp_path: Path):
    from spotline.cli import cli

    result = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "c"), "--video",
                                       "--seed", "3", "--clips", "1", "--frames", "12",
                                       "--size", "192x128", "--sides", "14-30", "--hide", "1"])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "c" / "clip_000")
    assert any(a["bbox"] is None for r in rows for a in r["annotations"])


def test_the_bench_counts_a_hidden_target_answered_no_box(tmp_path: Path):
    """A hidden target's truth is None with its hidden flag: answered with no box it is a
    right abstention (precision and recall, as a caption naming nothing) and counted as
    "hidden answered no box"; answered with a box, a wrong one."""
    folder = _clips(tmp_path, 1.0, frames=12)[0]
    frames = load_clip(folder)
    rows = _rows(folder)
    for frame, row in zip(frames, rows, strict=True):
        assert frame.hidden == tuple(a["bbox"] is None for a in row["annotations"])
        assert all((t is None) == h for t, h in zip(frame.truth, frame.hidden, strict=True))
    hidden = sum(sum(f.hidden) for f in frames)
    assert hidden >= 3
    frames = with_absent(frames, synth.all_captions(), 1, seed=0)  # + a caption naming nothing
    assert all(f.hidden[-1] is False and f.truth[-1] is None for f in frames)

    right, boxed = Tally(), Tally()
    prev_right = prev_boxed = None
    for f in frames:
        right.frames += 1
        boxed.frames += 1
        # every target's true box while in view; no box while hidden and for the absent one
        prev_right = right.add(f, list(f.truth), prev_right)
        # a box for a hidden target (where it was last seen), no box for the absent caption
        last = [t if t is not None else (0.0, 0.0, 10.0, 10.0) for t in f.truth[:-1]]
        prev_boxed = boxed.add(f, [*last, None], prev_boxed)
    r, b = right.report(), boxed.report()
    assert r["hidden"] == b["hidden"] == hidden and r["hidden_no_box"] == hidden
    assert b["hidden_no_box"] == 0
    n = len(frames)
    assert r["abstain_precision"] == r["abstain_recall"] == 1.0 and r["accuracy"] == 1.0
    assert b["abstain_precision"] == 1.0 and b["abstain_recall"] == n / (n + hidden)
    assert r["flips_per_100_frames"] == 0.0  # a hidden frame's caption is no flip
    text = table({"clips": ["c"], "frames": n,
                  "pipeline": {"per_frame": r, "track": b, "crops_ratio": 1.0,
                               "fps_ratio": 1.0}})
    assert f"{hidden} of {hidden}" in text and f"0 of {hidden}" in text
