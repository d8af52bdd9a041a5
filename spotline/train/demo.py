"""The committed demo models (``models/demo/``): small models trained by spotline's own
commands on synthetic scenes of coloured shapes, and the settings they need.

- ``apply_demo_models(settings)``: when ``settings.models`` is ``demo`` and no weight path is
  set, the settings of ``models/demo/settings.toml`` (the weight paths, the image size the
  detector was trained at, upscaling off, no TTA) replace the defaults; anything the user set
  explicitly is kept. ``spotline up`` and ``spotline demo`` call it; ``models = "tiny"``
  keeps the random tiny models (tests).
- ``retrain(...)``: `spotline models demo --retrain` makes them again from nothing: synthetic
  train/val/test splits, the scorer and the detector trained in parallel (one core each), the
  scorer's calibration fitted on the val split (``calibrate``), the held-out accuracy measured
  with the in-process reference, the manifest written. `spotline models demo --calibrate`
  fits the calibration alone again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotline.common.errors import ConfigError
from spotline.common.settings import Settings
from spotline.stages.runtime import resolve_path

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "models" / "demo"
SETTINGS_FILE = "settings.toml"
MANIFEST_FILE = "manifest.json"
WEIGHT_KEYS = ("detector_weights", "upscaler_weights", "scorer_dir")
# the detector's thresholds the demo models run at (settings.toml), also when mining with it
THRESHOLDS: dict[str, Any] = {"conf": 0.1, "iou": 0.5, "max_det": 20}

NOTE = ("NOTE: these are the demo models: small models (a 0.35 M-parameter YOLOv8 and a "
        "1.5 M-parameter SigLIP) trained here on synthetic scenes of coloured shapes "
        "(`spotline models demo --retrain`). They find \"{colour} {shape}\" objects such as "
        "\"red star\" and nothing else, and on scenes of a renderer they never saw about 3 "
        "captions in 4 (docs/training.md); set SPOTLINE_DETECTOR_WEIGHTS / _SCORER_DIR for "
        "real weights.")


@dataclass(frozen=True)
class DemoPlan:
    """What `spotline models demo --retrain` makes (the defaults are the committed models')."""

    work: str = ".spotline/demo-train"
    out: str = str(DEMO_DIR)
    style: str = "randomised"  # spotline data synth --style: every domain randomisation on
    long_side: int = 384  # training frames' long side (each its own aspect ratio)
    train_seed: int = 1
    train_images: int = 1000
    val_seed: int = 2
    val_images: int = 100
    test_seed: int = 3  # held out: never used for training or validation
    test_images: int = 300
    family_seed: int = 31  # the held-out family (another renderer, 384-1920 px): never trained on
    family_images: int = 60
    scorer_epochs: int = 70  # beside the detector's first phase, which takes longer anyway
    detector_schedule: str = "448:12"  # (imgsz:epochs) phases, beside the scorer
    detector_more: tuple[int, ...] = (20,)  # then phases of N epochs on both cores
    mined_epochs: int = 6  # the scorer again on the detector's own false detections
    mined_lr: float = 1e-4
    threads: int = 1  # per training process; the two run side by side
    calibration_absent: int = 1  # captions per val image naming nothing, for "not in view"
    calibration_precision: float = 0.8  # "not in view" threshold's abstention precision on val
    # track mode's own threshold, on val clips (the val seed's moving shapes, targets hidden for
    # a few frames, a caption a frame naming nothing) run through track mode
    val_clips: int = 4
    val_clip_frames: int = 48
    val_clip_size: tuple[int, int] = (960, 544)
    val_clip_hide: float = 0.5
    track_calibration_precision: float = 0.9

    def options(self, seed: int, images: int) -> Any:
        """The synth options of one split: the plan's style at its training frame size (each
        frame's long side ``long_side``, at one of synth's aspect ratios)."""
        from spotline.data import synth

        if self.style == synth.RANDOMISED:
            return synth.randomised_options(seed=seed, images=images,
                                            sizes=(self.long_side, self.long_side))
        return synth.SynthOptions(seed=seed, images=images, style=self.style,
                                  sizes=(self.long_side, self.long_side))


def demo_dir() -> Path:
    return DEMO_DIR


def demo_overlay(directory: Path | None = None) -> dict[str, Any]:
    """The settings the demo models need, weight paths made absolute; {} when absent."""
    directory = directory or DEMO_DIR
    path = directory / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for key in WEIGHT_KEYS:
        if values.get(key):
            values[key] = str(resolve_path(values[key], base=REPO))
    return values


def wants_demo(settings: Settings) -> bool:
    """Demo models are selected and no weight path is set."""
    return settings.models == "demo" and not any(getattr(settings, k) for k in WEIGHT_KEYS)


def apply_demo_models(settings: Settings, directory: Path | None = None) -> Settings:
    """The settings with the demo models and their settings where the user kept defaults."""
    if not wants_demo(settings):
        return settings
    overlay = demo_overlay(directory)
    if not overlay:
        return settings
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    changes = {k: v for k, v in overlay.items()
               if k in defaults and getattr(settings, k) == defaults[k]}
    if "imgsz" in changes:
        # settings.toml's imgsz is the size the detector was trained at, on frames of the
        # plan's size: it runs at that scale on a frame of any size (the imgsz it names on
        # the training frames; --config settings.toml keeps the fixed size)
        trained = changes.pop("imgsz") / DemoPlan().long_side
        if settings.imgsz_scale == defaults["imgsz_scale"]:
            changes["imgsz_scale"] = trained
    return settings.replace(**changes)


def is_demo(settings: Settings, directory: Path | None = None) -> bool:
    """These settings run the demo models."""
    overlay = demo_overlay(directory)
    return bool(overlay) and all(
        getattr(settings, key) and overlay.get(key)
        and resolve_path(getattr(settings, key)) == Path(overlay[key])
        for key in ("scorer_dir", "detector_weights"))


# --- demo scenes -------------------------------------------------------------------------------
DEMO_SCENES_SEED = 2026  # not a training, validation or test seed


def demo_scenes(n: int = 3) -> list[tuple[str, bytes, list[tuple[str, list[int]]]]]:
    """(name, JPEG bytes, ground truth) of ``n`` synthetic scenes, made on the fly
    (deterministic)."""
    from spotline.data import synth

    options = synth.SynthOptions(seed=DEMO_SCENES_SEED, images=n, size=(384, 256))
    out = []
    for index in range(n):
        scene = synth.make_scene(options, index)
        out.append((f"scene_{index}.jpg", synth.encode_jpeg(scene.image, scene.quality),
                    [(o.caption, list(o.box)) for o in scene.objects]))
    return out


# --- retraining --------------------------------------------------------------------------------
def chance_of(images: list[Any]) -> float:
    """Accuracy of picking one ground-truth box of the image at random: the mean over
    captions of 1 / (boxes in the caption's image). ``images`` have ``annotations``."""
    terms = [1.0 / len(img.annotations) for img in images for _ in img.annotations]
    return sum(terms) / len(terms) if terms else 0.0


def chance_accuracy(dataset: str | Path) -> float:
    """chance_of the records of a dataset."""
    from spotline.producer.dataset import read_dataset

    return chance_of(read_dataset(dataset).records)


def make_data(plan: DemoPlan, say: Callable[[str], None]) -> dict[str, Path]:
    """The synthetic train, val and held-out test splits (seeds from the plan)."""
    from spotline.data import synth

    work = Path(plan.work)
    out = {}
    for name, seed, n in (("train", plan.train_seed, plan.train_images),
                          ("val", plan.val_seed, plan.val_images),
                          ("test", plan.test_seed, plan.test_images)):
        started = time.monotonic()
        options = plan.options(seed, n)
        out[name] = synth.synthesize(work / "data", options, split=name)[name]
        say(f"synth {name}: {n} images (seed {seed}) in {time.monotonic() - started:.0f} s")
    return out


def train_both(plan: DemoPlan, data: dict[str, Path], say: Callable[[str], None]) -> dict[str, Any]:
    """The scorer and the detector trained side by side (two processes, `threads` each)."""
    work = Path(plan.work)
    spotline = [sys.executable, "-m", "spotline"]
    scorer_cmd = [*spotline, "finetune", "scorer", str(data["train"]), str(work / "scorer"),
                  "--val", str(data["val"]), "--from-scratch", "--epochs",
                  str(plan.scorer_epochs), "--threads", str(plan.threads), "--no-progress"]
    detector_cmd = [*spotline, "finetune", "detector", str(data["train"]),
                    str(work / "detector"), "--val", str(data["val"]), "--model", "pico",
                    "--schedule", plan.detector_schedule, "--threads", str(plan.threads)]
    env = {**os.environ, "SPOTLINE_MODELS": "tiny"}
    started = time.monotonic()
    logs = {name: open(work / f"{name}.log", "w") for name in ("scorer", "detector")}  # noqa: SIM115
    procs = {name: subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, env=env)
             for name, cmd in (("scorer", scorer_cmd), ("detector", detector_cmd))}
    say(f"training the scorer and the detector (logs: {work}/scorer.log, detector.log)")
    try:
        codes = {name: proc.wait() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for fh in logs.values():
            fh.close()
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        raise RuntimeError(f"training failed: {failed} (see {work}/<name>.log)")
    more = more_detector_phases(plan, data, spotline, env, say)
    mined = mined_scorer_phase(plan, data, spotline, env, say)
    return {"seconds": round(time.monotonic() - started), "scorer_cmd": scorer_cmd[1:],
            "detector_cmd": detector_cmd[1:], "detector_more": more, "scorer_mined": mined}


def mined_scorer_phase(plan: DemoPlan, data: dict[str, Path], spotline: list[str],
                       env: dict[str, str], say: Callable[[str], None]) -> list[list[str]]:
    """The trained detector's false detections on the training images become hard negatives
    (`spotline data mine`), and the scorer trains on them for ``mined_epochs`` more; its
    result replaces WORK/scorer/scorer. [] when ``mined_epochs`` is 0."""
    if not plan.mined_epochs:
        return []
    work = Path(plan.work)
    mined = work / "data" / "train-mined"
    # the detector as the pipeline runs it on these frames: the demo settings' thresholds
    run_env = {**env, **{f"SPOTLINE_{k.upper()}": str(v) for k, v in THRESHOLDS.items()}}
    mine_cmd = [*spotline, "data", "mine", str(data["train"]), str(mined), "--detector",
                str(work / "detector" / "detector.pt"), "--imgsz", str(detector_imgsz(plan))]
    scorer_cmd = [*spotline, "finetune", "scorer", str(mined), str(work / "scorer-mined"),
                  "--val", str(data["val"]), "--base", str(work / "scorer" / "scorer"),
                  "--epochs", str(plan.mined_epochs), "--lr", str(plan.mined_lr),
                  "--threads", str(2 * plan.threads), "--no-progress"]
    for name, cmd in (("mine", mine_cmd), ("scorer-mined", scorer_cmd)):
        say(f"{name}: {' '.join(cmd[3:6])} ...")
        with open(work / f"{name}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env).returncode:
                raise RuntimeError(f"{name} failed (see {work}/{name}.log)")
    final = work / "scorer" / "scorer"
    shutil.rmtree(final)
    shutil.copytree(work / "scorer-mined" / "scorer", final)
    return [mine_cmd[1:], scorer_cmd[1:]]


def more_detector_phases(plan: DemoPlan, data: dict[str, Path], spotline: list[str],
                         env: dict[str, str], say: Callable[[str], None]) -> list[list[str]]:
    """Further detector phases on all training images, each from the last one's weights; the
    final weights end up in WORK/detector/detector.pt."""
    work, done = Path(plan.work), []
    last = work / "detector" / "detector.pt"
    for k, epochs in enumerate(plan.detector_more, 2):
        out = work / f"detector{k}"
        cmd = [*spotline, "finetune", "detector", str(data["train"]), str(out), "--val",
               str(data["val"]), "--model", str(last), "--imgsz", str(detector_imgsz(plan)),
               "--epochs", str(epochs), "--threads", str(2 * plan.threads)]
        say(f"detector phase on all training images: {epochs} epochs")
        with open(work / f"detector{k}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"detector phase {k} failed (see {work}/detector{k}.log)")
        last = out / "detector.pt"
        done.append(cmd[1:])
    if done:
        shutil.copyfile(last, work / "detector" / "detector.pt")
    return done


def detector_imgsz(plan: DemoPlan) -> int:
    """The image size of the detector's last training phase (it runs at that size)."""
    return int(plan.detector_schedule.split(",")[-1].split(":")[0])


def install(plan: DemoPlan, tuned: dict[str, Any]) -> Path:
    """Copy the trained models into ``plan.out`` with their settings overlay."""
    work, out = Path(plan.work), Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "detector" / "detector.pt", out / "detector.pt")
    tmp = out / ".scorer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "scorer" / "scorer", tmp,
                    ignore=shutil.ignore_patterns("training_state.pt", "trainer.json"))
    shutil.rmtree(out / "scorer", ignore_errors=True)
    os.replace(tmp, out / "scorer")
    rel = os.path.relpath(out.resolve(), REPO)
    lines = ["# Settings the demo models need; applied by `spotline up` and `spotline demo` when",
             "# no weights are configured (models = \"demo\"), or pass this file with --config",
             "# from the repository root.",
             f'detector_weights = "{rel}/detector.pt"', f'scorer_dir = "{rel}/scorer"',
             "upscale = false  # no upscaler was trained for the demo models",
             f"imgsz = {detector_imgsz(plan)}  # the size the detector was last trained at",
             "tta = false", "warmup = 1"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in tuned.items()]
    (out / SETTINGS_FILE).write_text("\n".join(lines) + "\n")
    return out


def measure(plan: DemoPlan, dataset: Path, settings: Settings) -> dict[str, Any]:
    """Accuracy of the installed demo models on ``dataset`` with the in-process reference."""
    from spotline.eval import evaluate
    from spotline.pipeline.reference import Reference

    demo = apply_demo_models(settings.replace(**{k: "" for k in WEIGHT_KEYS}, models="demo"),
                             Path(plan.out))
    ref = Reference(demo)
    report = evaluate(dataset, lambda imgs, caps: [r.boxes for r in ref.identify(imgs, caps)],
                      progress=False, batch_size=4)
    return {"accuracy": round(report.accuracy, 4), "captions": report.n_captions,
            "images": report.n_images, "chance": round(chance_accuracy(dataset), 4),
            "seconds": round(report.total_seconds, 1)}


def calibrate(plan: DemoPlan, val: Path, settings: Settings,
              say: Callable[[str], None]) -> dict[str, Any]:
    """Fit the installed demo scorer's calibration and "not in view" model on the val split
    (never the test split), then track mode's own threshold on val clips, and write
    calibration.json beside it; what was fitted."""
    from spotline.bench.video import fit_track_threshold
    from spotline.data.synth import all_captions
    from spotline.eval.grounding import fit_calibration
    from spotline.producer.dataset import load_til

    demo = apply_demo_models(settings.replace(**{k: "" for k in WEIGHT_KEYS}, models="demo"),
                             Path(plan.out))
    cal, path = fit_calibration(demo, load_til(val), absent=plan.calibration_absent,
                                target_precision=plan.calibration_precision)
    fit = cal.threshold_fit
    say(f"calibration: temperature {cal.temperature:.3f}, bias {cal.bias:.3f}; not in view "
        f"under P(in view) {cal.threshold:.3f} (val abstentions precision "
        f"{fit.get('precision', float('nan')):.3f}, recall {fit.get('recall', 0.0):.3f}): "
        f"{path}")
    clips = val_clips(plan, say)
    say("track mode's threshold on the val clips (track mode in-process, twice)...")
    cal, path = fit_track_threshold(demo, clips, absent=plan.calibration_absent,
                                    target_precision=plan.track_calibration_precision,
                                    vocabulary=all_captions())
    track = cal.track_threshold_fit
    say(f"track mode: not in view under P(in view) {cal.track_threshold:.3f} (val clips' "
        f"abstentions precision {track['precision']:.3f}, recall {track['recall']:.3f})")
    return {"file": f"scorer/{path.name}", "split": "val", "seed": plan.val_seed,
            "images": plan.val_images, "absent_per_image": plan.calibration_absent,
            "threshold": round(float(cal.threshold or 0.0), 4),
            "val_precision": round(float(fit.get("precision", float("nan"))), 4),
            "val_recall": round(float(fit.get("recall", 0.0)), 4),
            "target_precision": plan.calibration_precision,
            "track": {"clips": plan.val_clips, "frames": plan.val_clip_frames,
                      "size": list(plan.val_clip_size), "hide": plan.val_clip_hide,
                      "threshold": round(float(cal.track_threshold or 0.0), 4),
                      "val_precision": _rounded(track["precision"]),
                      "val_recall": _rounded(track["recall"]),
                      "target_precision": plan.track_calibration_precision}}


def _rounded(value: float) -> float | None:
    """A figure for the manifest (JSON has no NaN: None where nothing was abstained on)."""
    return None if value != value else round(float(value), 4)


def val_clips(plan: DemoPlan, say: Callable[[str], None]) -> Path:
    """The val clips (`spotline data synth --video` at the val seed), made when missing."""
    from spotline.data import synth
    from spotline.data.video import write_clips

    out = Path(plan.work) / "data" / "val-clips"
    if len(list(out.glob("*/vlm.jsonl"))) < plan.val_clips:
        options = synth.SynthOptions(seed=plan.val_seed, size=plan.val_clip_size)
        write_clips(out, options, plan.val_clips, plan.val_clip_frames, plan.val_clip_hide)
        say(f"synth val clips: {plan.val_clips} x {plan.val_clip_frames} frames (seed "
            f"{plan.val_seed})")
    return out


def recalibrate(plan: DemoPlan, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """`spotline models demo --calibrate`: the val split (made again when missing), the
    calibration fitted on it, the manifest's ``calibration`` entry updated."""
    from spotline.data import synth

    val = Path(plan.work) / "data" / "val"
    if not (val / "vlm.jsonl").is_file():
        options = plan.options(plan.val_seed, plan.val_images)
        val = synth.synthesize(Path(plan.work) / "data", options, split="val")["val"]
        say(f"synth val: {plan.val_images} images (seed {plan.val_seed})")
    fitted = calibrate(plan, val, settings, say)
    manifest_path = Path(plan.out) / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        manifest["calibration"] = fitted
        manifest.setdefault("plan", {}).update(
            {k: v for k, v in dataclasses.asdict(plan).items()
             if k.startswith(("calibration_", "val_clip", "track_calibration"))})
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return fitted


def retrain(plan: DemoPlan, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """Everything: data, training, installing, measuring; writes the manifest."""
    started = time.monotonic()
    data = make_data(plan, say)
    trained = train_both(plan, data, say)
    install(plan, THRESHOLDS)
    calibration = calibrate(plan, data["val"], settings, say)
    manifest = {"plan": dataclasses.asdict(plan), "training": trained,
                **measure_both(plan, settings, say), "calibration": calibration,
                "minutes": round((time.monotonic() - started) / 60, 1)}
    (Path(plan.out) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    say(f"{manifest['minutes']} minutes in all")
    return manifest


def measure_both(plan: DemoPlan, settings: Settings, say: Callable[[str], None]
                 ) -> dict[str, Any]:
    """The installed models' accuracy on the own test split and on the held-out family
    (in-process reference; either split rendered again under WORK/data when missing)."""
    from spotline.data import synth

    data = Path(plan.work) / "data"
    out = {}
    for key, name, options in (
            ("test", "test", plan.options(plan.test_seed, plan.test_images)),
            ("family", "family",
             synth.heldout_options(seed=plan.family_seed, images=plan.family_images))):
        split = data / name
        if not (split / synth.DATASET_FILE).is_file():
            synth.synthesize(data, options, split=name)
        say(f"measuring on {'the own test split' if key == 'test' else 'the held-out family'}"
            " (in-process reference)...")
        out[key] = measure(plan, split, settings)
        say(f"{key}: accuracy {out[key]['accuracy']:.4f} on {out[key]['captions']} captions "
            f"(chance {out[key]['chance']:.4f})")
    return out


def remeasure(plan: DemoPlan, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """`spotline models demo --measure`: both figures again, written into the manifest."""
    measured = measure_both(plan, settings, say)
    path = Path(plan.out) / MANIFEST_FILE
    if path.is_file():
        manifest = json.loads(path.read_text())
        manifest.update(measured)
        path.write_text(json.dumps(manifest, indent=1) + "\n")
    return measured


# --- bench -------------------------------------------------------------------------------------
def bench_accuracy(settings: Settings, frames: int = 40) -> dict[str, Any] | None:
    """The demo models' accuracy and throughput together (in-process reference) on the first
    ``frames`` images of the held-out test split, rendered on the fly: `spotline bench` prints
    it so that a speed change that costs accuracy shows. None without demo models."""
    from spotline.data import synth
    from spotline.eval import accuracy
    from spotline.pipeline.reference import Reference

    plan = DemoPlan()
    demo = apply_demo_models(settings.replace(**{k: "" for k in WEIGHT_KEYS}, models="demo"))
    if not is_demo(demo):
        return None
    options = plan.options(plan.test_seed, frames)
    scenes = [synth.make_scene(options, i) for i in range(frames)]
    images = [synth.encode_jpeg(s.image, s.quality) for s in scenes]
    captions = [[o.caption for o in s.objects] for s in scenes]
    ref = Reference(demo)
    started = time.perf_counter()
    results = [ref.identify([img], [caps])[0] for img, caps in zip(images, captions, strict=True)]
    seconds = time.perf_counter() - started
    preds = [box for r in results for box in r.boxes]
    truth = [list(o.box) for s in scenes for o in s.objects]
    chance = sum(1.0 / len(s.objects) for s in scenes for _ in s.objects) / max(1, len(truth))
    return {"frames": frames, "captions": len(truth), "accuracy": round(accuracy(preds, truth), 4),
            "chance": round(chance, 4), "frames_per_s": round(frames / seconds, 2)}


def bench_line(result: dict[str, Any] | None) -> list[str]:
    """The bench table's lines for bench_accuracy."""
    if not result:
        return []
    return ["", f"demo models (reference, {result['frames']} held-out synthetic frames): "
                f"accuracy {result['accuracy']:.4f} (chance {result['chance']:.4f}) at "
                f"{result['frames_per_s']:.2f} frames/s"]
