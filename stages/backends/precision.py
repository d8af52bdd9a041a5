"""``export_precision auto``: each model's precision chosen by measurement on this machine.

For one model on one exported engine, the candidates are fp32 (always: the reference), its
fp16 export where it runs as bf16 (OpenVINO on a CPU with AMX-BF16 or AVX512_BF16; ONNX
Runtime on a CUDA device) and its int8 export where the CPU has int8 dot-product units
(AMX-INT8, AVX512_VNNI, AVX-VNNI) — of those, the ones exported. Each candidate is loaded in
turn, run on a few fixed held-out inputs of the model's own input shape (fp32 first: its
outputs are the reference), and timed (best of ``runs`` calls after a warm-up). A candidate
whose outputs drift from fp32's by more than ``max_drift`` (1 - the cosine of the outputs,
each centred on the reference's mean; the detector's boxes and class scores apart; SigLIP's
caption×crop similarities one caption at a time)
is refused and logged; of the rest, the fastest wins if it beats fp32 by ``MIN_GAIN``.

The choice is kept in the export folder (``auto-precision.json``, keyed by engine, device,
threads, input shape and the CPU's model and flags, for the checkpoint's hash), so a worker
measures once per machine and later ones start as fast as before."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import CpuInfo, cpu_info

log = logging.getLogger(__name__)

AUTO = "auto"
MAX_DRIFT = 0.01
MIN_GAIN = 1.1  # a lower precision must be this much faster than fp32 to be chosen
RUNS = 2
CACHE = "auto-precision.json"
METHOD = 2  # in the cache key: a change of the inputs or the drift check measures again

Runner = Callable[[Any], Sequence[np.ndarray]]
Compare = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]


@dataclass(frozen=True)
class Choice:
    """One model's precision and why. ``reason`` is short (a metric label): set, torch,
    only-fp32, fastest, not-faster, drift-refused; ``detail`` the figures behind it."""

    model: str
    precision: str
    reason: str
    detail: str = ""
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    drift: Mapping[str, float] = field(default_factory=dict)
    cached: bool = False

    def line(self) -> str:
        how = " (cached)" if self.cached else ""
        return (f"{self.model}: precision {self.precision} ({self.reason}){how}"
                + (f": {self.detail}" if self.detail else ""))


# --- the drift check --------------------------------------------------------------------------
def centred_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """The cosine of two arrays after both are centred on the reference's mean (a plain
    cosine of images or of large positive coordinates is near 1 whatever they hold)."""
    ref = np.asarray(reference, np.float64).ravel()
    oth = np.asarray(other, np.float64).ravel()
    if ref.shape != oth.shape:
        return 0.0
    mean = ref.mean() if ref.size else 0.0
    ref, oth = ref - mean, oth - mean
    norm = float(np.linalg.norm(ref) * np.linalg.norm(oth))
    if norm == 0.0:
        return 1.0 if np.array_equal(ref, oth) else 0.0
    return float(np.dot(ref, oth) / norm)


def drift(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """How far a candidate's outputs are from fp32's: 1 - the lowest centred cosine over the
    outputs."""
    if len(reference) != len(outputs):
        return 1.0
    return max((1.0 - centred_cosine(r, o) for r, o in zip(reference, outputs, strict=True)),
               default=0.0)


def detector_drift(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The detector's raw output ``(batch, 4 + classes, anchors)``: boxes and class scores
    compared apart (box coordinates in pixels would hide a change of the scores)."""
    worst = 0.0
    for ref, out in zip(reference, outputs, strict=False):
        if ref.ndim == 3 and ref.shape[1] > 4 and ref.shape == out.shape:
            worst = max(worst, drift([ref[:, :4]], [out[:, :4]]), drift([ref[:, 4:]],
                                                                      [out[:, 4:]]))
        else:
            worst = max(worst, drift([ref], [out]))
    return worst if len(reference) == len(outputs) else 1.0


def scorer_drift(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The scorer's caption×crop similarities (crops × captions): each caption's scores
    across the crops compared apart, the worst one counts. What grounding decides is which
    crop a caption scores highest, so it is the order of the crops per caption that must
    hold: on the demo SigLIP, NNCF int8 moved image embeddings by only 0.004 (1 - cosine)
    but the per-caption scores by 0.017, and cost 0.029 accuracy on the held-out split
    (bf16: 0.0006, accuracy +0.004)."""
    if len(reference) != len(outputs):
        return 1.0
    worst = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        if ref.ndim == 2 and ref.shape == out.shape:
            # each caption's scores on their own mean: a shift of all of them keeps the order
            worst = max([worst, *(1.0 - centred_cosine(r - r.mean(), o - o.mean())
                                  for r, o in zip(ref.T, out.T, strict=True))])
        else:
            worst = max(worst, drift([ref], [out]))
    return worst


# --- candidates -------------------------------------------------------------------------------
def candidates(engine: str, device: str, exported: Sequence[str],
               cpu: CpuInfo | None = None) -> tuple[list[str], str]:
    """The precisions worth measuring for an export on ``engine`` (fp32 first) and, when that
    is fp32 alone, why."""
    cpu = cpu or cpu_info()
    cuda = device.startswith("cuda")
    out = ["fp32"] if "fp32" in exported else []
    why: list[str] = []
    if "fp16" in exported:
        if cuda and engine == "onnx":
            out.append("fp16")
        elif engine == "openvino" and cpu.bf16:
            out.append("fp16")  # OpenVINO runs an fp16 IR at bf16 on this CPU
        else:
            why.append("no bf16 units" if not cpu.bf16 else f"fp16 on {engine} CPU is slow")
    else:
        why.append("no fp16 export")
    if "int8" in exported:
        if cpu.int8 and not cuda:
            out.append("int8")
        else:
            why.append("no int8 units" if not cpu.int8 else "int8 not used on CUDA")
    else:
        why.append("no int8 export")
    return out, ", ".join(why)


def describe(precision: str, engine: str, cpu: CpuInfo | None = None) -> str:
    """What a precision runs as here: fp16 on OpenVINO's CPU plugin is bf16."""
    cpu = cpu or cpu_info()
    if precision == "fp16" and engine == "openvino" and cpu.bf16:
        return f"fp16 (bf16 on {cpu.bf16})"
    if precision == "int8" and cpu.int8:
        return f"int8 ({cpu.int8})"
    return precision


# --- the measurement --------------------------------------------------------------------------
def measure(model: str, precisions: Sequence[str], load: Callable[[str], Runner],
            inputs: Sequence[Any], runs: int = RUNS, max_drift: float = MAX_DRIFT,
            compare: Compare = drift, clock: Callable[[], float] = time.perf_counter,
            label: Callable[[str], str] = str) -> Choice:
    """Load each precision in turn (``load``), run it on every input (the first call is the
    warm-up; fp32's outputs are the reference), time ``runs`` more calls on the first input
    and keep the best; refuse a precision whose drift exceeds ``max_drift``; choose the
    fastest of the rest when it beats fp32 by ``MIN_GAIN``, else fp32."""
    if not precisions or precisions[0] != "fp32":
        raise ValueError(f"the candidates must start with fp32 (the reference), got "
                         f"{list(precisions)}")
    timings: dict[str, float] = {}
    drifts: dict[str, float] = {}
    reference: list[Sequence[np.ndarray]] = []
    for precision in precisions:
        run = load(precision)
        outputs = [list(run(x)) for x in inputs]
        best = float("inf")
        for _ in range(max(1, runs)):
            t0 = clock()
            run(inputs[0])
            best = min(best, clock() - t0)
        del run
        timings[precision] = best * 1000
        if precision == "fp32":
            reference, drifts[precision] = outputs, 0.0
        else:
            drifts[precision] = max(compare(r, o) for r, o in zip(reference, outputs,
                                                                 strict=True))
    refused = {p for p, d in drifts.items() if d > max_drift}
    for p in sorted(refused):
        log.warning("%s: precision %s refused: its outputs drift %.4f from fp32's (limit %g)",
                    model, label(p), drifts[p], max_drift)
    base = timings["fp32"]
    fast = [p for p in precisions if p != "fp32" and p not in refused
            and timings[p] * MIN_GAIN <= base]
    chosen = min(fast, key=timings.__getitem__) if fast else "fp32"
    faster_refused = any(timings[p] < timings[chosen] for p in refused)
    reason = ("drift-refused" if faster_refused else "fastest" if fast
              else "only-fp32" if len(precisions) == 1 else "not-faster")
    detail = "; ".join(
        f"{label(p)} {timings[p]:.1f} ms ({base / timings[p]:.2f}x fp32, drift "
        f"{drifts[p]:.4f}{', REFUSED' if p in refused else ''})" for p in precisions)
    return Choice(model, chosen, reason, detail, {p: round(t, 3) for p, t in timings.items()},
                  {p: round(d, 6) for p, d in drifts.items()})


# --- the cache --------------------------------------------------------------------------------
def cache_key(engine: str, device: str, threads: int, shape: str, max_drift: float,
              cpu: CpuInfo | None = None) -> str:
    cpu = cpu or cpu_info()
    return f"v{METHOD}|{engine}|{device}|{threads}|{shape}|{max_drift:g}|{cpu.signature()}"


def cached_choice(directory: Path, sha256: str, key: str) -> Choice | None:
    """A choice measured before on this machine for this checkpoint, or None."""
    try:
        data = json.loads((directory / CACHE).read_text(encoding="utf-8"))
        entry = data[sha256][key]
        return Choice(**{**entry, "cached": True})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(directory: Path, sha256: str, key: str, choice: Choice) -> None:
    """Keep a choice for the next start (atomically; an unwritable folder only loses it)."""
    path = directory / CACHE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    entry = {k: v for k, v in asdict(choice).items() if k != "cached"}
    data = {sha256: {**data.get(sha256, {}), key: entry}}  # other checkpoints' choices go
    tmp = path.with_name(f".{CACHE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("cannot keep the precision choice in %s: %s", path, exc)


# --- each model's trial: how to load it and what it runs on ------------------------------------
HELD_OUT_FRAME = (1520, 870)  # width, height: the competition's frames (the seed's warm-up)
UPSCALE_CROP = (60, 100)  # height, width: a typical detected box
PROMPTS = tuple(f"This is a photo of {c}." for c in (
    "red star", "blue circle", "grey missile", "yellow helicopter", "green square",
    "white commercial aircraft"))


@dataclass(frozen=True)
class Trial:
    """What ``measure`` needs for one model: a loader per precision, held-out inputs and how
    outputs are compared."""

    load: Callable[[str], Runner]
    inputs: list[Any]
    shape: str
    compare: Compare = drift


def held_out_image(seed: int, width: int, height: int) -> np.ndarray:
    """A fixed synthetic BGR image (a sky-like gradient, noise and a few solid shapes):
    inputs no model was calibrated or trained on, the same on every run."""
    import cv2

    rng = np.random.default_rng(seed)
    ramp = np.linspace(90, 200, height, dtype=np.float32)[:, None, None]
    img = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(5):
        x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        w, h = int(rng.integers(width // 20, width // 5)), int(rng.integers(height // 20,
                                                                          height // 5))
        color = [int(c) for c in rng.integers(0, 256, 3)]
        if rng.integers(0, 2):
            cv2.rectangle(img, (x, y), (x + w, y + h), color, -1)
        else:
            cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, color, -1)
    return img


def detector_trial(source: Path, engine: str, meta: Mapping[str, Any], device: str,
                   threads: int, imgsz: int) -> Trial:
    """The raw network on two letterboxed held-out frames at ``imgsz`` (no TTA, no NMS)."""
    from . import load_detector
    from .detector import letterbox

    stride = int(meta.get("stride", 32))
    tensors = [letterbox(held_out_image(k, *HELD_OUT_FRAME), imgsz, stride).tensor
               for k in range(2)]

    def load(precision: str) -> Runner:
        det = load_detector(source, engine, precision, threads, device)
        return lambda x: det.engine.run({det.input: x})

    return Trial(load, tensors, "x".join(map(str, tensors[0].shape)), detector_drift)


def upscaler_trial(source: Path, engine: str, meta: Mapping[str, Any], device: str,
                   threads: int, imgsz: int) -> Trial:
    """Two held-out crops of a detected box's typical size."""
    from . import load_upscaler

    h, w = UPSCALE_CROP
    crops = [np.ascontiguousarray(held_out_image(10 + k, w, h)[..., ::-1].astype(np.float32)
                                  .transpose(2, 0, 1)[None] / 255.0) for k in range(2)]

    def load(precision: str) -> Runner:
        up = load_upscaler(source, engine, precision, threads, device)
        return lambda x: up.engine.run({up.input: x})

    return Trial(load, crops, "x".join(map(str, crops[0].shape)))


def scorer_trial(source: Path, engine: str, meta: Mapping[str, Any], device: str,
                 threads: int, imgsz: int) -> Trial:
    """Timed: a batch of two held-out crops through the vision tower (the hot path). Checked:
    the caption×crop similarities of eight held-out crops and six prompts (both towers), each
    caption's scores across the crops against fp32's (``scorer_drift``)."""
    from . import load_scorer
    from .scorer import normalise, preprocess

    side = int(meta.get("image_size", [384])[0])
    timed = preprocess([held_out_image(20 + i, side, side)[..., ::-1].copy() for i in range(2)],
                       dict(meta))
    crops = preprocess([held_out_image(30 + i, 96, 96)[..., ::-1].copy() for i in range(8)],
                       dict(meta))
    inputs: list[Any] = [("vision", timed), ("scores", crops)]

    def load(precision: str) -> Runner:
        scorer = load_scorer(source, engine, precision, threads, device)
        texts = scorer.text_embeds(list(PROMPTS))

        def run(item: tuple[str, Any]) -> Sequence[np.ndarray]:
            kind, value = item
            images = scorer.vision.run({scorer.vision_input: value})[0]
            if kind == "vision":
                return []  # timed only: its drift is checked through the scores
            return [normalise(images) @ texts.T]

        return run

    return Trial(load, inputs, "x".join(map(str, timed.shape)), scorer_drift)


TRIALS: dict[str, Callable[..., Trial]] = {"detector": detector_trial,
                                           "upscaler": upscaler_trial, "scorer": scorer_trial}


def choose(model: str, settings: Any, source: Path | str, threads: int) -> tuple[str, Choice]:
    """(engine, precision choice) of one model (detector, upscaler, scorer) under the
    settings ``backend``, ``export_precision[_<model>]``, ``device`` and
    ``precision_max_drift``; the choice is logged once."""
    engine, choice = _choose(model, settings, Path(source), threads)
    log.info("%s", choice.line())
    return engine, choice


def _choose(model: str, settings: Any, source: Path, threads: int) -> tuple[str, Choice]:
    from . import choose_backend, onnx_has_cuda
    from .manifest import PRECISIONS, verified_manifest

    requested = settings.precision_for(model)
    device = settings.device
    if requested != AUTO:
        engine = choose_backend(settings.backend, source, requested, device)
        return engine, Choice(model, requested if engine != "torch" else "fp32", "set",
                              f"export_precision {requested} on {engine}")
    engine = choose_backend(settings.backend, source, "fp32", device)
    if engine == "torch":
        return engine, Choice(model, "fp32", "torch", "no fp32 export of this checkpoint on "
                              "this machine's runtimes (spotline export)"
                              if settings.backend == "auto" else "backend torch")
    directory, manifest = verified_manifest(source, model)
    exported = [p for p in PRECISIONS if manifest.has(engine, p)]
    if "fp32" not in exported:  # nothing to check a lower precision against: take what is
        log.warning("%s: no %s fp32 export to measure against; running %s unchecked", model,
                    engine, exported[0] if exported else "fp32")
        return engine, Choice(model, exported[0] if exported else "fp32", "set",
                              f"the only {engine} export (no fp32 to check it against)")
    cuda = device.startswith("cuda") or (device == "auto" and engine == "onnx"
                                         and onnx_has_cuda())
    precisions, why = candidates(engine, "cuda" if cuda else "cpu", exported)
    if precisions == ["fp32"]:
        return engine, Choice(model, "fp32", "only-fp32", f"{engine}: {why}")
    trial = TRIALS[model](source, engine, manifest.meta, device, threads, _imgsz(settings))
    max_drift = float(settings.precision_max_drift)
    key = cache_key(engine, device, threads, trial.shape, max_drift)
    hit = cached_choice(directory, manifest.sha256, key)
    if hit is not None and hit.precision in precisions:
        return engine, hit
    t0 = time.perf_counter()
    choice = measure(model, precisions, trial.load, trial.inputs, max_drift=max_drift,
                     compare=trial.compare, label=lambda p: describe(p, engine))
    log.info("%s: measured %s on %s in %.1f s", model, ", ".join(precisions), engine,
             time.perf_counter() - t0)
    remember(directory, manifest.sha256, key, choice)
    return engine, choice


def _imgsz(settings: Any) -> int:
    """The detector's input size for the held-out frames: ``imgsz``, or where it follows the
    frame (0), the frame's long side rounded up to the stride, at most ``imgsz_cap``."""
    if settings.imgsz:
        return int(settings.imgsz)
    side = -(-max(HELD_OUT_FRAME) // 32) * 32
    return min(side, int(getattr(settings, "imgsz_cap", side) or side))
