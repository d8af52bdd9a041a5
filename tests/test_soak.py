"""`spotline bench soak`: a few seconds of it (the hidden --seconds) through the real CLI
and a real local pipeline: every frame published gets exactly one result, and the report has
each process's memory and Redis' used_memory. The 20-minute figures are in docs/reliability.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from spotline.common.settings import Settings
from tests.conftest import child_env


def test_a_short_soak_answers_every_frame(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(imgsz=320, warmup=0, tta=False, upscale=False)
    env = child_env(s, "")
    env.pop("SPOTLINE_REDIS_URL")  # the soak runs its own pipeline and embedded Redis
    out = subprocess.run([sys.executable, "-m", "spotline", "bench", "soak", "--seconds", "6",
                          "--rate", "2", "--json", str(tmp_path / "soak.json")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"frames (\d+), results \1 .*results == frames: True", out.stdout), out.stdout
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["frames"] >= 10 and report["results"] == report["frames"]
    assert report["duplicates"] == 0 and report["lossless"]
    assert {"detect#0", "score#0", "collect#0", "redis-server"} <= set(report["rss"])
    assert all(r["end_mib"] > 0 for r in report["rss"].values())
    assert set(report["redis_used_memory"]) == {"start", "warm", "end"}


def test_a_soak_of_clips_in_track_mode_keeps_the_ask_memory_under_its_cap(
        settings: Settings, tmp_path: Path) -> None:
    """`bench soak --clips` in track mode: the clip's frames loop as one source, the track
    stage keeps its ask memory, and a cap small enough to bind within seconds holds it: the
    report's samples never pass the cap, the oldest records go first (the kept span stops
    growing with the frames), and an answer over the whole window comes back."""
    from click.testing import CliRunner

    from spotline.cli import cli
    from spotline.train.demo import apply_demo_models

    res = CliRunner().invoke(cli, ["data", "synth", str(tmp_path / "clips"), "--video",
                                   "--seed", "29", "--clips", "1", "--frames", "12"])
    assert res.exit_code == 0, res.output
    cap = 6000
    s = apply_demo_models(settings).replace(warmup=0, tracking=True, ask_embed_every_s=0.0,
                                            ask_max_bytes_per_source=cap)
    env = child_env(s, "")
    env.pop("SPOTLINE_REDIS_URL")
    out = subprocess.run([sys.executable, "-m", "spotline", "bench", "soak", "--seconds", "8",
                          "--rate", "4", "--clips", str(tmp_path / "clips"), "--json",
                          str(tmp_path / "soak.json")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["lossless"] and report["errors"] == 0
    mem = report["memory"]
    assert mem["source"] == "soak" and mem["cap_bytes"] == cap
    samples = mem["samples"]  # [seconds, records, bytes, minutes kept]
    assert len(samples) >= 2 and all(0 < b <= cap for _, _, b, _ in samples)
    assert report["frames"] > samples[-1][1] > 0, "the cap dropped the oldest records"
    assert samples[-1][3] < report["frames"] / 4 / 60, "the kept span is less than the soak"
    assert mem["bytes_per_minute"] > 0
    assert len(mem["answer_ms"]) == 6 and mem["answer_records"] == samples[-1][1]
    assert "within the cap" in out.stdout and "an answer over the whole window" in out.stdout
