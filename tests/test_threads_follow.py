"""Cores that follow the work (threads_policy follow): the policy is a pure function of the other
stages' backlogs (alone → every core; every stage busy → the static share), and a real worker
on a real Redis applies it before each batch, to torch and to exported engines alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotline.common import cores
from spotline.common.codec import encode
from spotline.common.envelope import Envelope
from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, load_settings
from spotline.common.transport import Transport
from spotline.common.worker import Worker
from spotline.stages import libs, runtime

MODEL_STAGES = ("detect", "upscale", "score")


# --- the policy -------------------------------------------------------------------------------
@pytest.mark.parametrize(("cores_n", "alone", "shares"), [
    (1, (1, 1, 1), (1, 1, 1)),
    (2, (2, 2, 2), (1, 1, 1)),
    (4, (4, 4, 4), (1, 1, 2)),
    (16, (16, 16, 16), (4, 4, 8)),
])
def test_alone_every_core_all_busy_the_static_share(cores_n: int, alone: tuple[int, ...],
                                                     shares: tuple[int, ...]) -> None:
    idle = {st: 0 for st in MODEL_STAGES}
    busy = {st: 3 for st in MODEL_STAGES}
    assert tuple(cores.follow_threads(cores_n, st, idle) for st in MODEL_STAGES) == alone
    got = tuple(cores.follow_threads(cores_n, st, busy) for st in MODEL_STAGES)
    assert got == shares
    assert got == tuple(cores.static_threads(cores_n, st, MODEL_STAGES) for st in MODEL_STAGES)


def test_idle_stages_lend_their_share() -> None:
    # 16 cores: detect and score busy, upscale idle → detect 16·1/3, score 16·2/3
    work = {"detect": 2, "upscale": 0, "score": 5}
    assert cores.follow_threads(16, "detect", work) == 5
    assert cores.follow_threads(16, "score", work) == 10
    # a stage's own backlog does not count against it; stages that run no model never do
    assert cores.follow_threads(16, "score", {"score": 9, "collect": 40}) == 16
    # upscaling off: the static shares are a third and two thirds
    assert cores.static_threads(12, "detect", ("detect", "score", "collect")) == 4
    assert cores.static_threads(12, None, MODEL_STAGES) == 12, "one process runs every stage"
    # track mode: detect beside a busy track stage (upscaler + scorer inside) takes a quarter
    assert cores.follow_threads(16, "detect", {"track": 1}) == 4


@given(cores_n=st.integers(1, 64), stage=st.sampled_from(MODEL_STAGES),
       work=st.fixed_dictionaries({s: st.integers(0, 3) for s in MODEL_STAGES}),
       extra=st.sampled_from(MODEL_STAGES))
def test_more_work_elsewhere_never_means_more_threads(cores_n: int, stage: str,
                                                      work: dict[str, int], extra: str) -> None:
    n = cores.follow_threads(cores_n, stage, work)
    assert 1 <= n <= cores_n
    busier = {**work, extra: work[extra] + 1}
    assert cores.follow_threads(cores_n, stage, busier) <= n
    assert n >= cores.static_threads(cores_n, stage, MODEL_STAGES)
    # with at least a core per share, the busy stages never ask for more than the machine has
    # (a stage running a batch holds it in flight: the others see it busy)
    work = {**work, stage: max(1, work[stage])}
    busy = {s for s, w in work.items() if w}
    if cores_n >= sum(cores.SHARES[s] for s in busy):
        assert sum(cores.follow_threads(cores_n, s, work) for s in busy) <= cores_n


def test_the_policy_is_a_checked_setting() -> None:
    assert load_settings(env={}).threads_policy == "follow"
    assert load_settings(env={"SPOTLINE_THREADS_POLICY": "static"}).threads_policy == "static"
    with pytest.raises(ConfigError, match="threads_policy must be one of"):
        load_settings(env={"SPOTLINE_THREADS_POLICY": "greedy"})


# --- a worker applies it ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random detector of its own, exported to both engines at fp32."""
    from spotline.export import export_model
    from spotline.stages.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path_factory.mktemp("follow") / "models")
    export_model("detector", paths["detector"], ("onnx", "openvino"), ("fp32",))
    return Path(paths["detector"])


@pytest.fixture
def keep_threads() -> object:
    """Put torch's and OpenCV's thread counts back after a test that changes them."""
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(before[0])
    cv2.setNumThreads(before[1])


def _engine_threads(engine: object) -> int:
    """The thread count the loaded model itself was made with (not the engine's own note)."""
    if hasattr(engine, "compiled"):
        return int(engine.compiled.get_property("INFERENCE_NUM_THREADS"))  # type: ignore[attr-defined]
    return int(engine.session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


def _frame(t: Transport, fid: str) -> None:
    image = (libs.ultralytics_assets() / "bus.jpg").read_bytes()
    env = Envelope(frame_id=fid, captions=("red bus",), image=image)
    t.add(t.keys.inbox("detect"), fid, encode(env))


@pytest.mark.parametrize("backend", ["torch", "openvino", "onnx"])
def test_worker_runs_each_batch_on_the_cores_left_idle(
        transport: Transport, settings: Settings, detector: Path, backend: str,
        monkeypatch: pytest.MonkeyPatch, keep_threads: object) -> None:
    """A detect worker, score's inbox holding work: the batch runs on detect's share; once
    score has drained, the next batch runs on every core, with the same boxes."""
    import torch

    from spotline.stages.detect import Detect

    monkeypatch.setattr(cores, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime, "cpu_count", lambda: 4)
    s = settings.replace(detector_weights=str(detector), backend=backend, upscale=False,
                         imgsz=320, warmup=0, batch_detect=1, follow_copy_max_mb=512)
    seen: list[tuple[int, int, np.ndarray]] = []
    made_with: list[int] = []
    machine = os.cpu_count() or 1

    class Recording(Detect):
        def process(self, batch: list[Envelope]) -> list:  # type: ignore[type-arg]
            out = super().process(batch)
            engine = getattr(self.model, "engine", None)
            threads = torch.get_num_threads() if engine is None else engine.threads
            made = threads if engine is None else _engine_threads(engine)
            made_with.append(made)
            seen.append((threads, __import__("cv2").getNumThreads(), np.concatenate(
                [env.boxes for _, env in out if env.boxes is not None] or [np.zeros((0, 4))])))
            return out

    stage = Recording(s)
    stage.setup()
    assert runtime.threads_for(s, "detect") == 1, "loaded on its static share (4 cores / 3)"
    worker = Worker(stage, s, transport, burst=True)
    for name in ("detect", "score"):
        transport.ensure_group(name)
    _frame(transport, "f0")
    _frame(transport, "f1")
    busy = Envelope(frame_id="x", captions=("a",))
    transport.add(transport.keys.inbox("score"), "x", encode(busy))  # score has work
    assert worker._step()
    transport.r.delete(transport.keys.inbox("score"))  # a score worker took it: score idle
    transport.ensure_group("score")
    assert worker._step()
    assert [(t, c) for t, c, _ in seen] == [(1, 1), (4, 4)]
    # the loaded model itself runs on more threads (OpenVINO caps the count at the cores
    # there are; ONNX Runtime takes it as asked)
    assert made_with[0] == 1 and (made_with[1] > 1 or machine == 1)
    # the same frame, the same boxes (within 1 px: sums in another order at another count)
    assert seen[0][2].shape == seen[1][2].shape
    assert np.abs(seen[0][2] - seen[1][2]).max(initial=0.0) <= 1.0
    assert worker.metrics.threads.labels("detect")._value.get() == 4


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_an_export_over_the_copy_limit_stays_one_loaded_model(detector: Path,
                                                               suffix: str) -> None:
    """follow_copy_max_mb: a model whose weights are over the limit is never held twice (each
    count is a full copy of its weights and buffers): asked for more threads it is loaded again
    at that count in place of the old one, asked for fewer it keeps its count; under the limit
    it keeps one per count. Checked on the loaded model itself, not the engine's note."""
    from spotline.stages.backends.engine import load_engine

    path = next((detector.parent / f"{detector.name}.export").rglob(f"*{suffix}"))
    size = load_engine(path, threads=1).weight_bytes
    assert size > 0
    big = load_engine(path, threads=1)
    machine = os.cpu_count() or 1
    assert big.use_threads(2, max_copy_bytes=size - 1) == 2
    assert big.threads == 2 and (_engine_threads(big) > 1 or machine == 1)
    assert len(getattr(big, "loaded", None) or big.sessions) == 1  # type: ignore[attr-defined]
    assert big.use_threads(1, max_copy_bytes=size - 1) == 2
    assert big.threads == 2 and (_engine_threads(big) > 1 or machine == 1)
    small = load_engine(path, threads=1)
    assert small.use_threads(2, max_copy_bytes=size) == 2
    assert small.threads == 2 and (_engine_threads(small) > 1 or (os.cpu_count() or 1) == 1)
    assert len(getattr(small, "loaded", None) or small.sessions) == 2  # type: ignore[attr-defined]
    no_copies = load_settings(env={"SPOTLINE_FOLLOW_COPY_MAX_MB": "0"})
    assert no_copies.follow_copy_max_mb == 0
    # no copies under follow: an export is loaded on every core (what follow gives it alone)
    assert runtime.export_threads(no_copies, "score") == runtime.cpu_count()
    assert runtime.export_threads(no_copies.replace(threads_policy="static"), "score") == \
        runtime.threads_for(no_copies, "score")
    with pytest.raises(ConfigError, match="follow_copy_max_mb"):
        load_settings(env={"SPOTLINE_FOLLOW_COPY_MAX_MB": "-1"})


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_the_threads_gauge_shows_what_an_export_runs_on(
        transport: Transport, settings: Settings, detector: Path, backend: str,
        monkeypatch: pytest.MonkeyPatch, keep_threads: object) -> None:
    """With no copies (follow_copy_max_mb 0, the default) an export is loaded once, on every
    core, and keeps that count when follow asks for fewer: the gauge shows the count it runs
    on, not the one asked for."""
    from spotline.stages.detect import Detect

    monkeypatch.setattr(cores, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime, "cpu_count", lambda: 4)
    s = settings.replace(detector_weights=str(detector), backend=backend, upscale=False,
                         imgsz=320, warmup=0, batch_detect=1, follow_copy_max_mb=0)
    stage = Detect(s)
    stage.setup()
    assert stage.model.engine.threads == 4  # loaded on every core
    worker = Worker(stage, s, transport, burst=True)
    for name in ("detect", "score"):
        transport.ensure_group(name)
    _frame(transport, "f0")
    busy = Envelope(frame_id="x", captions=("a",))
    transport.add(transport.keys.inbox("score"), "x", encode(busy))  # score has work
    assert worker._step()
    assert worker.threads == 1  # follow asked for detect's share...
    assert stage.model.engine.threads == 4  # ...which the export does not take
    assert worker.metrics.threads.labels("detect")._value.get() == 4


def test_static_policy_and_fixed_threads_leave_the_share(transport: Transport,
                                                         settings: Settings) -> None:
    from tests.stagelib import PassThrough

    for s in (settings.replace(threads_policy="static"), settings.replace(torch_threads=3)):
        worker = Worker(PassThrough(s), s, transport)
        assert worker.take_cores() == 0
