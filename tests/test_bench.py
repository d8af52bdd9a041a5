"""`spotline bench stream --quick`: every documented field of the JSON report is there with a sane
value. Figures only: no timing is asserted (this machine is shared and slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.settings import load_settings
from spotline.stages import runtime

STAGES = ("detect", "upscale", "score", "collect")


@pytest.fixture(scope="module")
def report(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(
        cli, ["bench", "stream", "--quick", "--json", str(out / "bench.json"), "--png",
              str(out / "bench.png")],
        env={"SPOTLINE_DATA_DIR": str(data_dir), "SPOTLINE_IMGSZ": "320",
             "SPOTLINE_WARMUP": "1"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "targets:" in result.output and "spotline bench real" in result.output
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads((out / "bench.json").read_text())
    data["_output"] = result.output
    return data


def _percentiles(lat: dict[str, float]) -> None:
    assert lat["n"] >= 1
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]


def test_transport_figures(report: dict[str, Any]) -> None:
    tr = report["transport"]
    assert tr["pipeline_url"] in ("tcp", "unix")
    for kind in ("tcp", "unix"):
        crops, jpeg = tr[kind]
        assert crops["bytes"] > 10 * 96 * 96 * 3 and jpeg["bytes"] > 50_000
        for fig in (crops, jpeg):
            assert 0 < fig["p50_ms"] <= fig["p99_ms"] and fig["n"] == 60
            assert set(fig["phases_p50_ms"]) == {"encode", "commit", "read", "decode"}


def test_reference_and_streaming_figures(report: dict[str, Any]) -> None:
    tiny = report["tiny"]
    assert len(tiny["frames"]) == 4 and tiny["slowest_stage"] in STAGES[:3]
    ref = tiny["reference"]
    assert ref["fps"] > 0 and ref["errors"] == 0 and ref["peak_rss_mb"]["reference"] > 100
    _percentiles(ref["latency"])
    for key in ("streaming", "streaming_scaled"):
        run = tiny[key]
        assert run["fps"] > 0 and run["steady_fps"] > 0 and run["ratio_vs_reference"] > 0
        assert run["errors"] == 0 and run["frames"] == 4
        _percentiles(run["latency"])
        assert set(run["phases"]) == set(STAGES)
        for phase in run["phases"].values():
            assert phase["entries"] >= 1 and phase["mean_batch"] >= 1
            assert all(phase[k] >= 0 for k in ("model_ms", "codec_ms", "redis_ms",
                                               "queue_wait_ms"))
        assert {"detect", "collect", "publish"} <= set(run["stages"])
        assert all(v > 100 for k, v in run["peak_rss_mb"].items() if k != "collect#0")
        assert run["redis"]["used_memory_peak"] > 0
        assert run["inbox_lengths_after"] == dict.fromkeys(STAGES, 0), "inputs are deleted"
        assert run["entry_sizes"]["collect"]["mean_bytes"] > 0
    assert tiny["streaming_scaled"]["workers"][tiny["slowest_stage"]] == 2
    assert set(tiny["streaming"]["threads"]) == set(STAGES[:3])


def test_light_load_and_backlog_figures(report: dict[str, Any]) -> None:
    light = report["tiny"]["light_load"]
    assert light["frames"] == 2
    for key in ("reference_p50_ms", "streaming_p50_ms", "streaming_overhead_p50_ms"):
        assert light[key] > 0
    assert isinstance(light["extra_p50_ms"], float)
    b = report["backlog"]
    assert b["frames"] == b["backlog_entries"] == 100
    assert 0.5 < b["ratio_to_image_bytes"] < 2.0
    assert b["used_memory_after_delete"] < b["used_memory_with_backlog"]


def test_targets_and_table(report: dict[str, Any]) -> None:
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 5 and any("light-load" in n for n in names)
    for t in report["targets"]:
        assert t["met"] in (True, False, None) and t["measured"] and t["target"]
    real = next(t for t in report["targets"] if t["name"].endswith("real"))
    assert real["met"] is None, "real-size architectures are off unless --real"
    assert report["machine"]["cpus"] >= 1 and report["settings"]["threads"]["score"] >= 1
    assert "streaming, 1 worker/stage" in report["_output"]


def test_thread_shares() -> None:
    base = load_settings(env={})
    for cores, want in ((1, (1, 1, 1)), (2, (1, 1, 1)), (4, (1, 1, 2)), (16, (4, 4, 8))):
        cpu_count = runtime.cpu_count
        try:
            runtime.cpu_count = lambda c=cores: c  # type: ignore[assignment]
            got = tuple(runtime.threads_for(base, st) for st in ("detect", "upscale", "score"))
            assert got == want, cores
            assert runtime.threads_for(base) == cores, "one process for every stage: all cores"
            no_up = base.replace(upscale=False)
            assert runtime.threads_for(no_up, "detect") == max(1, cores // 3)
        finally:
            runtime.cpu_count = cpu_count  # type: ignore[assignment]
    assert runtime.threads_for(base.replace(torch_threads=3), "score") == 3
