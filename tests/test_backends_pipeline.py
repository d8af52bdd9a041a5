"""`bench backends`' whole-pipeline part on tiny models exported to OpenVINO: the torch
in-process reference, the in-process reference on the exports and the streaming pipeline on the
exports run on the same frames, and the report carries the frames/s ratio, latency p50/p99 and
the light-load ratio (figures, not targets: only their presence and consistency are checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotline.common.settings import load_settings


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from spotline.export import export_model
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("pipe") / "models")
    for kind in ("detector", "upscaler", "scorer"):
        export_model(kind, paths[kind], ("openvino",), ("fp32",))
    return {k: str(v) for k, v in paths.items()}


def test_pipeline_on_exports_against_the_references(exported: dict[str, str],
                                                   tmp_path: Path) -> None:
    from spotline.bench import exported as bench_exported

    settings = load_settings(env={}, models="tiny", data_dir=str(tmp_path), imgsz=320,
                             tta=False, backend="openvino", warmup=0)
    report = bench_exported.pipeline_vs_reference(settings, exported, frames=2, light=1,
                                                  compare_static=False, say=lambda _m: None,
                                                  timeout_s=300)
    assert (report["backend"], report["precision"], report["threads_policy"]) == (
        "openvino", "fp32", "follow")
    stream, ref = report["streaming"], report["reference_torch"]
    assert stream["errors"] == 0 and stream["latency"]["n"] == 2
    assert stream["light_latency"]["n"] == 1
    assert report["fps_ratio_vs_torch_reference"] == round(stream["fps"] / ref["fps"], 3)
    assert report["light_ratio_vs_exported_reference"] > 0
    assert set(stream["peak_rss_mb"]) >= {"detect#0", "upscale#0", "score#0"}
    assert report["targets"]["fps_ratio"]["met"] in (True, False)
    text = bench_exported.lines(report)
    assert "streaming on the exports" in text and "light load" in text
