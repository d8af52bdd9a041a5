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
