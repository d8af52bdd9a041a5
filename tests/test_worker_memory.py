"""What keeps an exported model's worker small (docs/performance.md, "Worker memory"), on tiny
random models in the real formats: SigLIP's crops scored in chunks give the scores of one
batch; OpenVINO's mapped weight file is not left resident beside the plugin's packed copy, and
still serves a later read; a compiled model left by a thread switch frees its buffers and runs
the same when used again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, load_settings
from spotline.export import export_model
from spotline.stages import backends
from spotline.stages.backends.engine import drop_file_pages, load_engine
from spotline.stages.backends.manifest import export_dir, read_manifest
from spotline.stages.score import GPU_CHUNK, Score, cpu_chunk

CAPTIONS = ("grey missile", "yellow helicopter", "a red car")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models of their own, the scorer exported to OpenVINO fp32."""
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("memory") / "models")
    export_model("scorer", paths["scorer"], ("openvino",), ("fp32",))
    return paths


def _settings(tiny: dict[str, Path], **changes: object) -> Settings:
    return load_settings(env={}, detector_weights=str(tiny["detector"]),
                         upscaler_weights=str(tiny["upscaler"]), scorer_dir=str(tiny["scorer"]),
                         warmup=0, **changes)


def _crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(17)
    return [rng.integers(0, 256, (int(rng.integers(8, 90)), int(rng.integers(8, 90)), 3),
                         dtype=np.uint8) for _ in range(n)]


def _vision_path(tiny: dict[str, Path]) -> Path:
    directory = export_dir(tiny["scorer"])
    return directory / read_manifest(directory).files["openvino-fp32"]["vision"]


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_chunked_scoring_matches_one_batch(tiny: dict[str, Path], backend: str) -> None:
    """11 crops in chunks of 1, 3 and the CPU default give one batch's scores within 1e-5."""
    crops = _crops(11)
    whole = Score(_settings(tiny, backend=backend, score_chunk=64))
    whole.setup()
    assert whole.chunk == 64
    reference = whole.logits_to_scores(whole.text_embeds(CAPTIONS), whole.image_embeds(crops))
    assert reference.shape == (3, 11)
    for chunk in (1, 3, 0):
        stage = Score(_settings(tiny, backend=backend, score_chunk=chunk))
        stage.setup()
        assert stage.chunk == (chunk or cpu_chunk(stage.input_size))
        got = stage.logits_to_scores(stage.text_embeds(CAPTIONS), stage.image_embeds(crops))
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)


def test_auto_chunk_keeps_input_pixels_per_call(tiny: dict[str, Path]) -> None:
    """Auto on the CPU: 2 crops a call for SigLIP-384 (larger calls are no faster per crop
    there and hold more), more for smaller inputs (a small model pays per call), never more
    than a GPU's chunk; the tower's input size is read from the model, torch or exported."""
    assert cpu_chunk((384, 384)) == 2
    assert cpu_chunk((224, 224)) == 5
    assert cpu_chunk((512, 512)) == 1
    assert cpu_chunk((32, 32)) == GPU_CHUNK
    for backend in ("torch", "openvino"):
        stage = Score(_settings(tiny, backend=backend))
        stage.setup()
        height, width = stage.input_size
        assert height > 0 and width > 0
        assert stage.chunk == cpu_chunk((height, width))


def test_score_chunk_is_checked(tiny: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="score_chunk"):
        _settings(tiny, score_chunk=-1)


def _resident_kib(path: Path) -> int | None:
    """This process's resident KiB of its mappings of ``path`` (None: not mapped)."""
    target, current, total, seen = str(path.resolve()), False, 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = len(head) >= 6 and head[5] == target
                seen |= current
            elif current and line.startswith("Rss:"):
                total += int(head[1])
    return total if seen else None


def test_mapped_weights_are_not_left_resident(tiny: dict[str, Path]) -> None:
    """After a run the .bin mapping holds no resident pages, and reading it again (a dropped
    page comes back from the file) gives the same outputs."""
    path = _vision_path(tiny)
    engine = load_engine(path, threads=1)
    name = engine.input_names[0]
    pixels = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    first = engine.run({name: pixels})[0]
    resident = _resident_kib(path.with_suffix(".bin"))
    if resident is None:
        pytest.skip("this OpenVINO build read the weights instead of mapping them")
    assert resident == 0
    # the model compiled afresh reads the mapped weights again: same result
    again = load_engine(path, threads=1).run({name: pixels})[0]
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(engine.run({name: pixels})[0], first)
    assert drop_file_pages({str(path.with_suffix(".bin").resolve())}) > 0


def test_thread_switch_releases_and_reuses(tiny: dict[str, Path]) -> None:
    """1 → 2 → 1 threads: two compiled models, the one left freed of its buffers each time;
    the first, used again, gives the same embeddings."""
    scorer = backends.load_scorer(tiny["scorer"], "openvino", threads=1)
    crops = _crops(5)
    one = scorer.image_embeds(crops, 2)
    assert scorer.vision.use_threads(2) == 2
    two = scorer.image_embeds(crops, 2)
    assert scorer.vision.use_threads(1) == 1
    assert sorted(scorer.vision.loaded) == [1, 2]
    np.testing.assert_array_equal(scorer.image_embeds(crops, 2), one)
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
