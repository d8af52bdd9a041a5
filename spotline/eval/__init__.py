"""The competition's scorer: accuracy as the mean of round(IoU) over captions, and the speed score.

Boxes are ``[left, top, width, height]`` in pixels. A hit needs IoU > 0.5: ``round(0.5)`` is 0
in Python (half to even), exactly as the competition scored it; a missing box scores 0. The
speed score is ``1 - min(t, t_max) / t_max`` over the whole test set.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spotline.producer.dataset import TilImage, load_til

# identify_fn(images, captions per image) -> per image, one [l, t, w, h] per caption
IdentifyFn = Callable[[list[bytes], list[list[str]]], Sequence[Sequence[Sequence[float]]]]


def iou_ltwh(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [left, top, width, height] boxes (0 when both are empty)."""
    al, at, aw, ah = (float(v) for v in a)
    bl, bt, bw, bh = (float(v) for v in b)
    aw, ah, bw, bh = max(aw, 0.0), max(ah, 0.0), max(bw, 0.0), max(bh, 0.0)
    iw = max(0.0, min(al + aw, bl + bw) - max(al, bl))
    ih = max(0.0, min(at + ah, bt + bh) - max(at, bt))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def hit(pred: Sequence[float] | None, gt: Sequence[float]) -> int:
    """round(IoU) as the competition scored it: 1 for IoU > 0.5, 0 otherwise or without a box."""
    if pred is None:
        return 0
    try:
        iou = iou_ltwh(pred, gt)
    except (TypeError, ValueError):  # not four numbers: scored like a missing box
        return 0
    return int(round(iou)) if math.isfinite(iou) else 0


def accuracy(preds: Sequence[Sequence[float] | None], gts: Sequence[Sequence[float]]) -> float:
    """Mean over ground-truth boxes of round(IoU); missing (None or absent) predictions score 0."""
    if len(preds) > len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth boxes")
    if not gts:
        return 0.0
    padded = list(preds) + [None] * (len(gts) - len(preds))
    return sum(hit(p, g) for p, g in zip(padded, gts, strict=True)) / len(gts)


def speed_score(t: float, t_max: float = 30.0) -> float:
    """1 - min(t, t_max) / t_max: 1 for instant, 0 at or beyond t_max seconds."""
    if t_max <= 0:
        raise ValueError(f"t_max must be > 0, got {t_max}")
    return 1.0 - min(max(float(t), 0.0), t_max) / t_max


@dataclass
class EvalReport:
    """Accuracy, speed score and latency of one evaluation run."""

    accuracy: float
    speed_score: float
    total_seconds: float
    n_images: int
    n_captions: int
    latency_p50: float
    latency_p95: float
    latency_p99: float
    latency_mean: float = 0.0
    t_max: float = 30.0
    per_caption: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, one per image
    # accuracy by frame size, object size, colour and background (``breakdown_lines``)
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        out = asdict(self)
        out["latencies"] = [round(v, 6) for v in self.latencies]
        return out

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.as_dict(), indent=2)

    def summary(self) -> str:
        """One line for humans."""
        return (f"accuracy {self.accuracy:.4f} ({self.n_captions} captions, {self.n_images} "
                f"images), speed score {self.speed_score:.4f} ({self.total_seconds:.2f} s, "
                f"t_max {self.t_max:g}), latency p50 {self.latency_p50 * 1000:.1f} ms, "
                f"p95 {self.latency_p95 * 1000:.1f} ms, errors {len(self.errors)}")


# --- the breakdown: accuracy by frame size, object size, colour and background ------------------
FRAME_EDGES = (640, 960, 1280, 1600)  # long side in px
OBJECT_EDGES = (16, 32, 64, 128)  # the true box's long side in px
BREAKDOWN_KEYS = ("frame size", "object size", "colour", "background")
UNKNOWN = "(not recorded)"


def bucket(value: float, edges: Sequence[int]) -> str:
    """The bucket of ``value`` among ``edges``: "<a", "a-b" (b excluded), ">=z"."""
    if value < edges[0]:
        return f"<{edges[0]}"
    for lo, hi in zip(edges, edges[1:], strict=False):
        if value < hi:
            return f"{lo}-{hi - 1}"
    return f">={edges[-1]}"


def _bucket_order(key: str, name: str) -> tuple[float, str]:
    """Size buckets in size order, others by name."""
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    if key in ("frame size", "object size") and digits:
        shift = -0.5 if name.startswith("<") else 0.5 if name.startswith(">=") else 0.0
        return (float(digits[0]) + shift, name)
    return (0.0, name)


def colour_of(caption: str) -> str:
    """The caption's first word when it is a colour of the synthetic vocabulary, else
    "other"."""
    from spotline.data.synth import COLOURS

    words = caption.strip().lower().split()
    return words[0] if words and words[0] in COLOURS else "other"


_META: dict[Path, dict[str, dict[str, Any]]] = {}


def image_meta(img: TilImage) -> dict[str, Any]:
    """The extra fields of an image's dataset line (e.g. synth's "background"), read once per
    vlm.jsonl; {} when there are none."""
    for folder in (img.image_path.parent.parent, img.image_path.parent):
        jsonl = folder / "vlm.jsonl"
        if jsonl.is_file():
            break
    else:
        return {}
    if jsonl not in _META:
        rows: dict[str, dict[str, Any]] = {}
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[str(row["image"])] = {k: v for k, v in row.items()
                                           if k not in ("image", "annotations")}
            except (ValueError, KeyError, TypeError):
                continue
        _META[jsonl] = rows
    return _META[jsonl].get(img.image_path.name, {})


def frame_long_side(img: TilImage, data: bytes | None = None) -> int | None:
    """The image's long side in pixels, from its header (None when unreadable)."""
    from spotline.common.images import image_size

    try:
        width, height = image_size(data if data is not None else img.image_path.read_bytes())
    except Exception:  # noqa: BLE001 - an unreadable image is scored, not bucketed
        return None
    return max(width, height)


@dataclass
class _Tally:
    hits: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    groups: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # [hits, n]

    def add(self, img: TilImage, boxes: Sequence[Any] | None, latency: float) -> None:
        """Score one image; None boxes (a failed call) score 0 like missing ones."""
        self.latencies.append(latency)
        preds = list(boxes) if boxes is not None else []
        if boxes is not None and len(preds) != len(img.annotations):
            self.error(img, f"expected {len(img.annotations)} boxes, got {len(preds)}")
        preds += [None] * (len(img.annotations) - len(preds))
        long_side = frame_long_side(img)
        frame = bucket(long_side, FRAME_EDGES) if long_side else UNKNOWN
        background = str(image_meta(img).get("background", UNKNOWN))
        for (caption, gt), pred in zip(img.annotations, preds, strict=False):
            self.counts[caption] = self.counts.get(caption, 0) + 1
            scored = hit(pred, gt)
            self.hits[caption] = self.hits.get(caption, 0) + scored
            for key, name in (("frame size", frame),
                              ("object size", bucket(max(gt[2], gt[3]), OBJECT_EDGES)),
                              ("colour", colour_of(caption)), ("background", background)):
                tally = self.groups.setdefault((key, name), [0, 0])
                tally[0] += scored
                tally[1] += 1

    def breakdown(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {k: {} for k in BREAKDOWN_KEYS}
        for (key, name), (hits, n) in self.groups.items():
            out[key][name] = {"n": n, "hits": hits, "accuracy": hits / n}
        return {k: dict(sorted(v.items(), key=lambda kv, k=k: _bucket_order(k, kv[0])))
                for k, v in out.items()}

    def error(self, img: TilImage, message: str) -> None:
        self.errors.append({"image": str(img.image_path), "error": message})

    def report(self, total: float, t_max: float) -> EvalReport:
        n = sum(self.counts.values())
        lat = np.asarray(self.latencies, dtype=np.float64)
        p50, p95, p99 = (float(np.percentile(lat, q)) if lat.size else 0.0 for q in (50, 95, 99))
        per_caption = {c: {"n": k, "hits": self.hits[c], "accuracy": self.hits[c] / k}
                       for c, k in sorted(self.counts.items())}
        return EvalReport(
            accuracy=sum(self.hits.values()) / n if n else 0.0,
            speed_score=speed_score(total, t_max), total_seconds=total,
            n_images=len(self.latencies), n_captions=n, latency_p50=p50, latency_p95=p95,
            latency_p99=p99, latency_mean=float(lat.mean()) if lat.size else 0.0, t_max=t_max,
            per_caption=per_caption, errors=self.errors, latencies=list(self.latencies),
            breakdown=self.breakdown())


def breakdown_lines(report: EvalReport) -> list[str]:
    """The breakdown as text: one line per grouping, ``bucket accuracy (hits/n)`` each."""
    lines = []
    for key, groups in report.breakdown.items():
        if not groups:
            continue
        cells = [f"{name} {g['accuracy']:.3f} ({int(g['hits'])}/{int(g['n'])})"
                 for name, g in groups.items()]
        lines.append(f"  {key + ':':13s} " + ", ".join(cells))
    return lines


def _run_batch(batch: list[TilImage], identify_fn: IdentifyFn, tally: _Tally
               ) -> tuple[list[Any], float]:
    """Call identify_fn on one batch: (per-image boxes or None, seconds); errors go to tally."""
    started = time.perf_counter()
    try:
        images = [img.image_path.read_bytes() for img in batch]
        started = time.perf_counter()
        out = list(identify_fn(images, [list(img.captions) for img in batch]))
        if len(out) != len(batch):
            raise ValueError(f"identify returned {len(out)} results for {len(batch)} images")
    except Exception as exc:  # one failing batch scores 0, the run goes on
        for img in batch:
            tally.error(img, f"{type(exc).__name__}: {exc}")
        return [None] * len(batch), time.perf_counter() - started
    return out, time.perf_counter() - started


def evaluate(dataset: str | Path | Iterable[TilImage], identify_fn: IdentifyFn,
             t_max: float = 30.0, progress: bool = True, batch_size: int = 1) -> EvalReport:
    """Run identify_fn over a TIL dataset and score it; each batch's time is its images' latency."""
    images = load_til(dataset) if isinstance(dataset, (str, Path)) else list(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tally = _Tally()
    started = time.perf_counter()
    with tqdm(total=len(images), disable=not progress, unit="img", desc="eval") as bar:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            results, seconds = _run_batch(batch, identify_fn, tally)
            for img, boxes in zip(batch, results, strict=True):
                tally.add(img, boxes, seconds)
            bar.update(len(batch))
    return tally.report(time.perf_counter() - started, t_max)


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write eval.json and eval.png (per-caption accuracy, latency histogram) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "eval.json", out / "eval.png"
    json_path.write_text(report.to_json() + "\n", encoding="utf-8")
    _chart(report).savefig(png_path, dpi=100)
    return json_path, png_path


def _chart(report: EvalReport) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot state) with the two panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(report.per_caption.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))
    fig = Figure(figsize=(12, max(4.0, 0.22 * len(rows) + 1.5)), layout="constrained")
    FigureCanvasAgg(fig)
    bars, hist = fig.subplots(1, 2, width_ratios=[3, 2])
    bars.barh([c for c, _ in rows], [s["accuracy"] for _, s in rows], color="tab:blue")
    bars.set_xlim(0, 1)
    bars.tick_params(axis="y", labelsize=7)
    bars.set_xlabel("accuracy (mean round(IoU))")
    bars.set_title(f"per caption - accuracy {report.accuracy:.4f}")
    ms = np.asarray(report.latencies, dtype=np.float64) * 1000.0
    hist.hist(ms, bins=min(50, max(5, ms.size // 5)) if ms.size else 5, color="tab:gray")
    for q, value, color in (("p50", report.latency_p50, "tab:green"),
                            ("p95", report.latency_p95, "tab:orange"),
                            ("p99", report.latency_p99, "tab:red")):
        hist.axvline(value * 1000.0, color=color, linestyle="--",
                     label=f"{q} {value * 1000:.1f} ms")
    hist.set_xlabel("latency per image (ms)")
    hist.set_ylabel("images")
    hist.set_title(f"speed score {report.speed_score:.4f} ({report.total_seconds:.2f} s)")
    hist.legend(fontsize=8)
    return fig
