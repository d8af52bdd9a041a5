"""`python -m spotline.bench.gpu` on the CPU with tiny models: every section (per-model torch
and ONNX Runtime timings, the reference's and the streaming pipeline's frames/s) runs through the
stages' own code and lands in gpu.json / gpu.txt; a failing or over-budget section is recorded
and the run goes on; on a device whose ONNX Runtime has no GPU provider the row says why.
Figures only: no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spotline.bench import gpu as bench_gpu
from spotline.common.settings import Settings, load_settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A data dir of its own: the ONNX exports land beside these tiny models, and a shared
    # data dir's exports would change other tests' `backend auto`.
    data = tmp_path_factory.mktemp("gpu-bench-data")
    return load_settings(env={}, data_dir=str(data), models="tiny", imgsz=320, warmup=1)


@pytest.fixture(scope="module")
def run(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu-bench-out")
    report = bench_gpu.run(settings, "cpu", real=False, runs=1, frames=1, rounds=1, out=out,
                           budget_s=900)
    return report, out


def test_every_section_through_the_stage_code(run: tuple[dict[str, Any], Path]) -> None:
    report, out = run
    sections = report["sections"]
    assert sections["environment"]["device"] == "cpu"
    assert "CPUExecutionProvider" in sections["environment"]["ort_providers"]
    torch_rows = sections["torch"]
    for name in ("detector@320", "detector_tta@320", "upscaler_60x100", "scorer_vision_x8",
                 "scorer_vision_x32", "scorer_text_x8"):
        fig = torch_rows[f"{name}-fp32"]
        assert fig["runs"] == 1 and 0 < fig["min_s"] <= fig["median_s"] <= fig["max_s"]
        assert "peak_gpu_mb" not in fig  # CPU: no GPU memory figure
        onnx = sections["onnx"][f"{name}-fp32"]
        assert onnx["median_s"] > 0
    assert torch_rows["fp16"].startswith("skipped: fp16 runs on CUDA only")
    assert sections["onnx"]["provider-fp32"] == "CPUExecutionProvider"
    ref = sections["reference"]
    assert ref["settings"]["device"] == "cpu" and ref["settings"]["imgsz"] == 320
    assert ref["figures"]["errors"] == 0 and ref["figures"]["single_fps"] > 0
    stream = sections["streaming"]
    assert stream["figures"]["errors"] == 0 and stream["figures"]["fps"] > 0
    assert stream["ratio_vs_reference"] > 0 and stream["redis_server"].endswith("redis-server")
    # written as it went: the files hold the same report, the text log every row
    assert json.loads((out / "gpu.json").read_text()) == json.loads(json.dumps(report,
                                                                               default=str))
    text = (out / "gpu.txt").read_text()
    assert "torch fp32 scorer_vision_x32" in text and "reference: batched" in text


def test_no_gpu_provider_is_reported_not_raised(settings: Settings,
                                                run: tuple[dict[str, Any], Path]) -> None:
    rec = bench_gpu.Recorder(None, budget_s=60)
    paths = run[0]["sections"]["models"]["paths"]
    bench_gpu.onnx_models(rec, settings, paths, "cuda", runs=1)  # this build: CPU provider only
    reason = rec.report["sections"]["onnx"]["missing"]
    assert "no CUDA/TensorRT provider" in reason and "64 MiB" in reason


def test_failing_and_over_budget_sections_are_recorded(tmp_path: Path) -> None:
    rec = bench_gpu.Recorder(tmp_path, budget_s=10)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("CUDA out of memory")

    rec.section("broken", broken)
    rec.section("late", lambda: ran.append("late"), needs_s=1e6)
    rec.section("fine", lambda: ran.append("fine"))
    sections = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert "RuntimeError: CUDA out of memory" in sections["broken"]["error"]
    assert sections["late"]["skipped"].startswith("budget")
    assert ran == ["fine"]


def test_time_call_counts_warmups_apart() -> None:
    calls: list[int] = []
    fig = bench_gpu.time_call(lambda: calls.append(1), "cpu", runs=3, warmup=2)
    assert len(calls) == 5 and fig["runs"] == 3
    assert fig["min_s"] <= fig["median_s"] <= fig["max_s"]
