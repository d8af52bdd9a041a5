"""``export_precision auto`` (the default): per model, the fastest export whose outputs on
held-out inputs stay within ``precision_max_drift`` of fp32's, among the precisions this CPU runs
fast; a drifting precision is refused and logged; the choice is kept per machine in the export
folder, logged once per model at start-up and exported as spotline_model_precision. The
selection below is the real code: candidate runners whose outputs and costs are set, and tiny
models exported to OpenVINO at fp32, fp16 and int8."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from spotline.common.settings import Settings, load_settings
from spotline.common.transport import Transport
from spotline.stages.backends import precision
from spotline.stages.backends.cpu import parse_cpuinfo

AMX = parse_cpuinfo("model name : Xeon\nflags : avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 "
                    "amx_int8 amx_tile\n")
VNNI_ONLY = parse_cpuinfo("model name : EPYC\nflags : avx2 avx512f avx512_vnni\n")
PLAIN = parse_cpuinfo("model name : Old\nflags : avx2\n")


class Clock:
    """Time that passes only when a candidate runs: each call costs its precision's ms."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _candidates(clock: Clock, cost_ms: dict[str, float], error: dict[str, float]
                ) -> Callable[[str], Callable[[np.ndarray], Sequence[np.ndarray]]]:
    """A loader of one "model" (a fixed linear map) per precision: each run costs
    ``cost_ms`` of the clock and adds ``error`` times a fixed pattern to the output."""
    weights = np.cos(np.outer(np.arange(64), np.arange(16)) * 0.3)
    pattern = np.cos(np.arange(16) * 1.7)

    def load(precision: str) -> Callable[[np.ndarray], Sequence[np.ndarray]]:
        def run(x: np.ndarray) -> Sequence[np.ndarray]:
            clock.now += cost_ms[precision] / 1000
            y = x @ weights
            return [y + error[precision] * np.abs(y).mean() * pattern]
        return run

    return load


INPUTS = [np.sin(np.arange(64) * (k + 1) * 0.37)[None] for k in range(3)]


def test_a_drifting_precision_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """int8 is the fastest, but its outputs drift past 0.01: fp16 (within the limit) wins."""
    clock = Clock()
    load = _candidates(clock, {"fp32": 10.0, "fp16": 4.0, "int8": 2.0},
                       {"fp32": 0.0, "fp16": 0.05, "int8": 1.0})
    with caplog.at_level(logging.WARNING, logger="spotline.stages.backends.precision"):
        choice = precision.measure("scorer", ["fp32", "fp16", "int8"], load, INPUTS,
                                   clock=clock)
    assert (choice.precision, choice.reason) == ("fp16", "drift-refused")
    assert choice.drift["int8"] > 0.01 >= choice.drift["fp16"] > 0
    assert choice.timings_ms == {"fp32": 10.0, "fp16": 4.0, "int8": 2.0}
    assert "REFUSED" in choice.detail and "2.50x fp32" in choice.detail
    assert any("precision int8 refused" in r.getMessage() and "0.01" in r.getMessage()
               for r in caplog.records)
    # the same candidates with a looser limit: int8 is taken
    loose = precision.measure("scorer", ["fp32", "fp16", "int8"], load, INPUTS, clock=clock,
                              max_drift=1.0)
    assert (loose.precision, loose.reason) == ("int8", "fastest")


def test_fp32_stays_unless_another_is_clearly_faster() -> None:
    clock = Clock()
    load = _candidates(clock, {"fp32": 10.0, "fp16": 9.5, "int8": 30.0},
                       {"fp32": 0.0, "fp16": 0.0, "int8": 0.0})
    choice = precision.measure("upscaler", ["fp32", "fp16", "int8"], load, INPUTS, clock=clock)
    assert (choice.precision, choice.reason) == ("fp32", "not-faster")  # 1.05x < MIN_GAIN
    with pytest.raises(ValueError, match="start with fp32"):
        precision.measure("upscaler", ["int8"], load, INPUTS, clock=clock)


def test_drift_measures() -> None:
    a = np.linspace(100, 900, 200)  # large positive values: a plain cosine hides changes
    assert precision.drift([a], [a]) == pytest.approx(0.0, abs=1e-12)
    assert precision.drift([a], [a[::-1]]) > 1.0  # anti-correlated once centred
    assert precision.drift([a], [a, a]) == 1.0  # not the same outputs
    boxes = np.full((1, 4, 50), 500.0) + np.arange(50)
    scores = np.linspace(0, 1, 50)[None, None]
    ref = np.concatenate([boxes, scores], axis=1)
    flipped = np.concatenate([boxes, scores[..., ::-1]], axis=1)
    assert precision.drift([ref], [flipped]) < 0.01  # the coordinates hide the scores...
    assert precision.detector_drift([ref], [flipped]) > 1.0  # ...compared apart, they do not
    # SigLIP's similarities (crops x captions): one caption's order of the crops reversed
    sims = np.stack([np.linspace(0.1, 0.3, 8) + 0.5 * j for j in range(6)], axis=1)
    moved = sims.copy()
    moved[:, 2] = moved[::-1, 2]
    assert precision.drift([sims], [moved]) < 0.01  # hidden among the other captions
    assert precision.scorer_drift([sims], [moved]) > 1.0
    assert precision.scorer_drift([sims], [sims + 0.01]) == pytest.approx(0.0, abs=1e-9)


def test_candidates_follow_the_cpu_and_the_exports() -> None:
    every = ("fp32", "fp16", "int8")
    assert precision.candidates("openvino", "cpu", every, AMX)[0] == ["fp32", "fp16", "int8"]
    assert precision.candidates("openvino", "cpu", every, VNNI_ONLY) == (
        ["fp32", "int8"], "no bf16 units")
    assert precision.candidates("openvino", "cpu", every, PLAIN) == (
        ["fp32"], "no bf16 units, no int8 units")
    assert precision.candidates("openvino", "cpu", ("fp32",), AMX) == (
        ["fp32"], "no fp16 export, no int8 export")
    assert precision.candidates("onnx", "cpu", every, AMX)[0] == ["fp32", "int8"]
    assert precision.candidates("onnx", "cuda", every, AMX)[0] == ["fp32", "fp16"]
    assert precision.describe("fp16", "openvino", AMX) == "fp16 (bf16 on amx_bf16)"


def test_auto_is_the_default_and_validated() -> None:
    from spotline.common.errors import ConfigError

    s = load_settings(env={})
    assert s.export_precision == "auto" and s.precision_for("scorer") == "auto"
    assert s.precision_max_drift == 0.01
    assert load_settings(env={"SPOTLINE_EXPORT_PRECISION_DETECTOR": "fp32"}).precision_for(
        "detector") == "fp32"
    with pytest.raises(ConfigError, match="precision_max_drift"):
        load_settings(env={"SPOTLINE_PRECISION_MAX_DRIFT": "2"})


# --- on real exports ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models exported to OpenVINO at every precision (int8 statically calibrated on the
    synthetic frames `spotline export` uses by default)."""
    from spotline.export import export_model
    from spotline.export.precision import synthetic_calibration
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("auto") / "models")
    calib = synthetic_calibration(4)
    for kind in ("detector", "upscaler", "scorer"):
        export_model(kind, paths[kind], ("openvino",), ("fp32", "fp16", "int8"), calib)
    return paths


def _settings(paths: dict[str, Path], **changes: object) -> Settings:
    return load_settings(env={}, detector_weights=str(paths["detector"]),
                         upscaler_weights=str(paths["upscaler"]),
                         scorer_dir=str(paths["scorer"]), imgsz=320, warmup=0, **changes)


def test_each_stage_chooses_and_keeps_its_precision(exported: dict[str, Path],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from spotline.stages.backends.cpu import cpu_info
    from spotline.stages.backends.manifest import export_dir
    from spotline.stages.detect import Detect
    from spotline.stages.score import Score
    from spotline.stages.upscale import Upscale

    settings = _settings(exported)
    wanted, _why = precision.candidates("openvino", "cpu", ("fp32", "fp16", "int8"))
    with caplog.at_level(logging.INFO, logger="spotline.stages.backends.precision"):
        stages = [Detect(settings), Upscale(settings), Score(settings)]
        for stage in stages:
            stage.setup()
    for stage, model in zip(stages, ("detector", "upscaler", "scorer"), strict=True):
        (choice,) = stage.precision_choices
        assert choice.model == model and choice.precision in wanted
        assert f"openvino {choice.precision})" in stage.model_name  # the one it loaded
        if wanted == ["fp32"]:
            assert choice.reason == "only-fp32"
            continue
        assert choice.reason in ("fastest", "not-faster", "drift-refused")
        assert set(choice.timings_ms) == set(wanted) and choice.drift["fp32"] == 0.0
        assert any(r.getMessage().startswith(f"{model}: precision {choice.precision} (")
                   for r in caplog.records)
        kept = json.loads((export_dir(exported[model]) / precision.CACHE).read_text())
        (entries,) = kept.values()
        (entry,) = entries.values()
        assert entry["precision"] == choice.precision
        assert cpu_info().signature() in next(iter(entries))
        again = type(stage)(settings)  # the next worker on this machine: no measuring again
        again.setup()
        assert again.precision_choices[0].cached
        assert again.precision_choices[0].precision == choice.precision


def test_a_set_precision_and_torch_are_said_too(exported: dict[str, Path],
                                                tmp_path: Path) -> None:
    import shutil

    from spotline.export import export_model
    from spotline.stages.upscale import Upscale

    stage = Upscale(_settings(exported, export_precision_upscaler="int8"))
    stage.setup()
    assert [(c.precision, c.reason) for c in stage.precision_choices] == [("int8", "set")]
    stage = Upscale(_settings(exported, backend="torch"))
    stage.setup()
    assert [(c.precision, c.reason) for c in stage.precision_choices] == [("fp32", "torch")]
    # an engine with no fp32 export: its one precision runs, unchecked, and says so
    source = tmp_path / "upscaler.pth"
    shutil.copyfile(exported["upscaler"], source)
    export_model("upscaler", source, ("onnx",), ("int8",))
    stage = Upscale(_settings(exported, backend="onnx").replace(upscaler_weights=str(source)))
    stage.setup()
    assert [(c.precision, c.reason) for c in stage.precision_choices] == [("int8", "set")]
    assert "no fp32 to check it against" in stage.precision_choices[0].detail


def test_the_choice_is_a_metric_label(exported: dict[str, Path], transport: Transport,
                                      settings: Settings) -> None:
    """A worker (burst mode, empty inbox) exports spotline_model_precision{model, precision,
    reason} 1 for its model once set up."""
    from spotline.common.metrics import Metrics
    from spotline.common.worker import Worker
    from spotline.stages.upscale import Upscale

    s = settings.replace(upscaler_weights=str(exported["upscaler"]),
                         scorer_dir=str(exported["scorer"]), warmup=0)
    metrics = Metrics()
    stage = Upscale(s)
    Worker(stage, s, transport, burst=True, metrics=metrics).run()
    (choice,) = stage.precision_choices
    value = metrics.registry.get_sample_value(
        "spotline_model_precision", {"model": "upscaler", "precision": choice.precision,
                                     "reason": choice.reason})
    assert value == 1.0
