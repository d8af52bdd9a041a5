"""The bench report read out: the targets (the TARGET_* figures below, which
docs/performance.md explains), the text table, JSON and PNG."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .probes import (
    PERCENTILES,
)

TARGET_HOP_P50_MS = 1.0
TARGET_HOP_P99_MS = 5.0
TARGET_TINY_RATIO = 0.95
TARGET_REAL_RATIO = 1.0
TARGET_LIGHT_EXTRA_MS = 10.0
TARGET_BACKLOG_RATIO = 1.25  # Redis bytes per payload byte held in a backlog


@dataclass
class Target:
    name: str
    target: str
    measured: str
    met: bool | None = None
    note: str = ""


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target (TARGET_*), met or not, with the figure measured."""
    out: list[Target] = []
    kind = report["transport"]["pipeline_url"]
    crops = report["transport"][kind][0]
    hop_ok = crops["p50_ms"] <= TARGET_HOP_P50_MS and crops["p99_ms"] <= TARGET_HOP_P99_MS
    out.append(Target("transport hop, 10-crop entry", f"p50 <= {TARGET_HOP_P50_MS} ms, p99 <= "
                      f"{TARGET_HOP_P99_MS} ms", f"p50 {crops['p50_ms']:.3f} ms, p99 "
                      f"{crops['p99_ms']:.3f} ms ({kind})", hop_ok))
    for label, want in (("tiny", TARGET_TINY_RATIO), ("real", TARGET_REAL_RATIO)):
        run = report.get(label)
        if not run:
            out.append(Target(f"streaming/reference throughput, {label}", f">= {want}x",
                              "not measured", None, "run with --real" if label == "real" else ""))
            continue
        one, two = run["streaming"]["ratio_vs_reference"], run["streaming_scaled"][
            "ratio_vs_reference"]
        out.append(Target(f"streaming/reference throughput, {label}", f">= {want}x",
                          f"{one:.2f}x one worker per stage, {two:.2f}x with two "
                          f"{run['slowest_stage']} workers", max(one, two) >= want))
    light = report["tiny"]["light_load"]
    out.append(Target("light-load latency vs reference (tiny)",
                      f"<= reference + {TARGET_LIGHT_EXTRA_MS:.0f} ms",
                      f"overhead {light['extra_overhead_p50_ms']:+.1f} ms (p50, paired); raw "
                      f"latency {light['streaming_p50_ms']:.1f} vs "
                      f"{light['reference_p50_ms']:.1f} ms ({light['extra_p50_ms']:+.1f} ms)",
                      light["extra_overhead_p50_ms"] <= TARGET_LIGHT_EXTRA_MS,
                      "judged on overhead = latency minus stage work: model time on a shared "
                      "CPU varies by more than 10 ms from run to run"))
    b = report["backlog"]
    bounded = (b["ratio_to_image_bytes"] <= TARGET_BACKLOG_RATIO and
               b["used_memory_after_delete"] <= b["used_memory_before"] + 8 * 2**20)
    out.append(Target(f"redis memory, {b['frames']}-frame backlog",
                      f"<= {TARGET_BACKLOG_RATIO}x the image bytes, freed after",
                      f"{b['ratio_to_image_bytes']:.2f}x ({b['bytes_per_frame'] / 1024:.0f} KiB"
                      f"/frame), {b['used_memory_after_delete'] / 2**20:.1f} MiB after delete",
                      bounded))
    return [asdict(t) for t in out]


# --- output -----------------------------------------------------------------------------------
def table(report: dict[str, Any]) -> str:
    """A short plain-text summary of a report."""
    lines = transport_lines(report)
    for label in ("tiny", "real"):
        if report.get(label):
            lines += [""] + _model_lines(report[label], label)
    b = report["backlog"]
    grown = (b["used_memory_with_backlog"] - b["used_memory_before"]) / 2**20
    lines += ["", f"redis, {b['frames']}-frame backlog: +{grown:.1f} MiB "
        f"({b['ratio_to_image_bytes']:.2f}x the image "
        f"bytes), {b['used_memory_after_delete'] / 2**20:.1f} MiB after delete; at high_water "
        f"{b['high_water']}: {b['bound_at_high_water_bytes'] / 2**20:.1f} MiB"]
    from spotline.train.demo import bench_line

    lines += bench_line(report.get("demo"))
    lines += ["", "targets:"]
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  [{mark:>6}] {t['name']}: {t['measured']} (target {t['target']})")
    return "\n".join(lines)


def transport_lines(report: dict[str, Any]) -> list[str]:
    tr = report["transport"]
    lines = [f"{'transport hop (codec + redis)':<34} {'url':>4} {'bytes':>8} {'p50 ms':>7} "
             f"{'p99 ms':>7}   encode/commit/read/decode p50 ms"]
    for kind in ("tcp", "unix"):
        for f in tr.get(kind, []):
            ph = f["phases_p50_ms"]
            lines.append(f"{f['name']:<34} {kind:>4} {f['bytes']:>8} {f['p50_ms']:>7.3f} "
                         f"{f['p99_ms']:>7.3f}   {ph['encode']:.3f}/{ph['commit']:.3f}/"
                         f"{ph['read']:.3f}/{ph['decode']:.3f}")
    return lines


def _model_lines(run: dict[str, Any], label: str) -> list[str]:
    ref, one, two = run["reference"], run["streaming"], run["streaming_scaled"]
    light = run["light_load"]
    lines = [f"{label} models, {len(run['frames'])} frames{'':<14} {'frames/s':>9} {'steady':>7} "
             f"{'x ref':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}  peak RSS MiB"]
    rows = [("reference, in-process", ref, 1.0),
            ("streaming, 1 worker/stage", one, one["ratio_vs_reference"]),
            (f"streaming, {run['slowest_stage']} x2", two, two["ratio_vs_reference"])]
    for name, r, ratio in rows:
        lat = r["latency"]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        steady = f"{r['steady_fps']:>7.3f}" if "steady_fps" in r else f"{'':>7}"
        lines.append(f"  {name:<33} {r['fps']:>9.3f} {steady} {ratio:>6.2f} "
                     f"{lat['p50_ms']:>9.1f} {lat['p95_ms']:>9.1f} {lat['p99_ms']:>9.1f}  {rss}")
    lines.append("  (reference: one frame at a time, or all at once where faster; streaming: "
                 "all frames sent at once; steady: between first and last result)")
    lines.append(f"  light load, {light['frames']} frame(s) one at a time: reference p50 "
                 f"{light['reference_p50_ms']:.1f} ms, streaming p50 "
                 f"{light['streaming_p50_ms']:.1f} ms (paired extra {light['extra_p50_ms']:+.1f}"
                 f" ms{', same threads' if light['same_threads'] else ''}); overhead "
                 f"(latency - stage work) {light['streaming_overhead_p50_ms']:.1f} vs "
                 f"{light['reference_overhead_p50_ms']:.1f} ms")
    if light.get("same_threads") and "auto_threads_p50_ms" in light:
        lines.append(f"  light load with the default thread shares {one['threads']}: p50 "
                     f"{light['auto_threads_p50_ms']:.1f} ms "
                     f"({light['auto_threads_extra_p50_ms']:+.1f} ms)")
    lines.append(f"  {'stage (1 worker/stage, burst)':<31} {'model ms':>9} {'codec ms':>9} "
                 f"{'redis ms':>9} {'queue ms':>9} {'batch':>6}   per entry")
    for stage, ph in one["phases"].items():
        lines.append(f"  {stage:<31} {ph['model_ms']:>9.2f} {ph['codec_ms']:>9.3f} "
                     f"{ph['redis_ms']:>9.3f} {ph['queue_wait_ms']:>9.1f} {ph['mean_batch']:>6.2f}")
    red = one["redis"]
    sizes = ", ".join(f"{k} {v['mean_bytes'] / 1024:.1f} KiB" for k, v in
                      one["entry_sizes"].items())
    lines.append(f"  entry size (mean) by target stream: {sizes}; redis peak "
                 f"{red['used_memory_peak'] / 2**20:.1f} MiB; inboxes after: "
                 f"{sum(one['inbox_lengths_after'].values())} entries")
    return lines


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_png(report: dict[str, Any], path: str | Path) -> None:
    """Throughput bars, latency percentiles and the per-stage time breakdown (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lb for lb in ("tiny", "real") if report.get(lb)]
    fig, axes = plt.subplots(len(labels), 3, figsize=(16, 4.6 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels, strict=True):
        _plot_models(row, report[label], label)
    fig.suptitle(f"spotline bench: {report['machine']['cpus']} CPUs, "
                 f"{report['machine']['platform']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_models(axes: Any, run: dict[str, Any], label: str) -> None:
    ref, one, two = run["reference"], run["streaming"], run["streaming_scaled"]
    slow = run["slowest_stage"]
    ax = axes[0]
    names = ["reference", "stream 1/stage", f"stream {slow} x2"]
    runs = [ref, one, two]
    bars = ax.bar(names, [r["fps"] for r in runs], color=["#888", "#3a7", "#2a6"])
    ax.bar_label(bars, labels=[f"{r['fps']:.3f} ({r['fps'] / ref['fps']:.2f}x)" for r in runs])
    ax.set_title(f"{label} models: throughput (frames/s)")
    ax = axes[1]
    light = run["light_load"]
    series = [("reference, 1 at a time", ref["latency"]),
              ("stream, 1 at a time", {f"p{p}_ms": light["streaming_p50_ms"] if p == 50
                                       else None for p in PERCENTILES}),
              ("stream 1/stage, burst", one["latency"]),
              (f"stream {slow} x2, burst", two["latency"])]
    x = np.arange(len(PERCENTILES))
    width = 0.2
    for i, (name, lat) in enumerate(series):
        vals = [lat.get(f"p{p}_ms") or 0.0 for p in PERCENTILES]
        ax.bar(x + (i - 1.5) * width, vals, width, label=name)
    ax.set_xticks(x, [f"p{p}" for p in PERCENTILES])
    ax.set_ylabel("ms")
    ax.set_title(f"{label}: end-to-end latency")
    ax.legend(fontsize=7)
    ax = axes[2]
    phases = one["phases"]
    stages = list(phases)
    bottom = np.zeros(len(stages))
    for key, colour in (("model_ms", "#3a7"), ("codec_ms", "#e90"), ("redis_ms", "#c33"),
                        ("queue_wait_ms", "#bbb")):
        vals = np.array([phases[st][key] for st in stages])
        ax.bar(stages, vals, bottom=bottom, label=key.removesuffix("ms"), color=colour)
        bottom += vals
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("ms per entry (symlog)")
    ax.set_title(f"{label}: time per entry by stage, 1 worker/stage, burst")
    ax.legend(fontsize=7)
