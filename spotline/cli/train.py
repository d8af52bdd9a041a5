"""The training commands: `spotline data synth|crops|check`, `spotline finetune scorer|detector`
and `spotline models demo`. Registered on the main group with one add_command line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spotline.common.errors import SpotlineError


def _settings() -> Any:
    ctx = click.get_current_context()
    obj = ctx.find_root().obj
    if obj is not None and hasattr(obj, "settings"):
        return obj.settings
    from spotline.common.settings import load_settings

    return load_settings()


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WxH such as 384x256, got {text!r}") from None
    return w, h


def _range(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split("-")]
    except ValueError:
        raise click.BadParameter(f"expected N or LO-HI, got {text!r}") from None
    return (parts[0], parts[-1]) if len(parts) in (1, 2) else (0, -1)


def _ratios(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected ratios such as 0.8,0.1,0.1, got {text!r}") from None


# --- spotline data -----------------------------------------------------------------------------
@click.group()
def data() -> None:
    """Synthetic datasets, training crops and dataset checks (TIL format: vlm.jsonl + images/)."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--images", "n_images", default=100, show_default=True, type=click.IntRange(1))
@click.option("--style", type=click.Choice(["classic", "randomised", "heldout"]),
              default="classic", show_default=True, help="classic: 384x256 scenes on four "
              "grounds; randomised: the training renderer with every domain-randomisation "
              "option on (eight grounds, 384-1920 px, clutter, faint, rotated, blurred, covered "
              "objects: what the demo models are trained on); heldout: the second family, for "
              "evaluation only (training refuses it). Options given override a style's preset.")
@click.option("--size", default=None, help="Image size WxH.  [default: 384x256]")
@click.option("--objects", default=None, help="Objects per image, LO-HI.  [default: 3-6]")
@click.option("--sides", default=None, help="Object size in px, LO-HI.  [default: 10-80]")
@click.option("--sizes", default=None, help="Each image its own size: long side LO-HI px at "
              "one of several aspect ratios (replaces --size).")
@click.option("--clutter", default=None, type=click.IntRange(0, 64),
              help="Marks that are not in the vocabulary per image, at most.")
@click.option("--low-contrast", default=None, type=click.FloatRange(0, 1),
              help="Chance an object is drawn faint.")
@click.option("--occlusion", default=None, type=click.FloatRange(0, 1),
              help="Chance an object is partly covered.")
@click.option("--rotate/--no-rotate", default=None, help="Rotate objects freely.")
@click.option("--motion-blur", default=None, type=click.FloatRange(0, 1),
              help="Chance an object is motion-blurred.")
@click.option("--split", default=None, help="Write into OUT/SPLIT (e.g. train, val, test).")
@click.option("--ratios", default=None, help="Split into OUT/train, OUT/val, OUT/test by these "
              "ratios, e.g. 0.8,0.1,0.1.")
@click.option("--video", is_flag=True, help="Short mp4 clips of moving objects instead, each "
              "with a per-frame vlm.jsonl.")
@click.option("--clips", default=2, show_default=True, help="With --video: clips.")
@click.option("--frames", default=48, show_default=True, help="With --video: frames per clip.")
@click.option("--hide", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="With --video: chance each object is hidden once for 3-6 frames (its "
              "truth there: \"bbox\": null; 0: the clips of earlier versions, byte for byte).")
def synth_cmd(out: str, seed: int, n_images: int, style: str, size: str | None,
              objects: str | None, sides: str | None, sizes: str | None, clutter: int | None,
              low_contrast: float | None, occlusion: float | None, rotate: bool | None,
              motion_blur: float | None, split: str | None, ratios: str | None, video: bool,
              clips: int, frames: int, hide: float) -> None:
    """Write a synthetic aerial dataset of coloured shapes to OUT (captions "{colour} {shape}",
    each naming exactly one object of its image; see docs in spotline/data/synth.py)."""
    from tqdm import tqdm

    from spotline.data import synth

    if split and ratios:
        raise click.UsageError("give --split or --ratios, not both")
    given = {"size": size and _size(size), "objects": objects and _range(objects),
             "sides": sides and _range(sides), "sizes": sizes and _range(sizes),
             "clutter": clutter, "low_contrast": low_contrast, "occlusion": occlusion,
             "rotate": rotate, "motion_blur": motion_blur}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        preset = {"heldout": synth.heldout_options, "randomised": synth.randomised_options,
                  "classic": synth.SynthOptions}[style]
        options = preset(seed=seed, images=n_images, **given)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if video:
        from spotline.data.video import write_clips

        for path in write_clips(Path(out), options, clips, frames, hide):
            click.echo(f"wrote {path}")
        return
    with tqdm(total=n_images, unit="img", desc="synth") as bar:
        written = synth.synthesize(out, options, split=split, ratios=_ratios(ratios),
                                   progress=bar.update)
    for name, path in written.items():
        n = sum(1 for line in (path / synth.DATASET_FILE).read_text().splitlines() if line)
        click.echo(f"{name}: {n} images -> {path}")


@data.command("crops")
@click.argument("dataset", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--upscaler", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Real-ESRGAN .pth: upscale each crop with the upscale stage's code.")
@click.option("--cap", default=None, type=int, help="Cap crop sides at this many px [default: "
              "the scorer's input size from the settings' scorer, else 384].")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) bad records instead of "
              "stopping at the first.")
def crops_cmd(dataset: str, out: str, upscaler: str | None, cap: int | None,
              skip_bad: bool) -> None:
    """Caption/crop pairs from DATASET's ground-truth boxes into OUT (crops.jsonl + images/),
    cut (and upscaled) exactly as the pipeline cuts them."""
    from tqdm import tqdm

    from spotline.data.crops import CropMaker, write_crops

    settings = _settings()
    if cap is None:
        cap = _default_cap(settings)
    maker = CropMaker(settings, cap, upscaler)
    with tqdm(unit="crop", desc="crops") as bar:
        n, summary = write_crops(dataset, out, maker, skip_bad=skip_bad, progress=bar.update)
    click.echo(summary)
    click.echo(f"{n} crops -> {out}")


def _default_cap(settings: Any) -> int:
    if settings.scorer_input_size:
        return int(settings.scorer_input_size)
    if settings.scorer_dir:
        from spotline.stages.runtime import scorer_input_size

        return scorer_input_size(settings, settings.scorer_dir)
    return 384


@data.command("mine")
@click.argument("dataset", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--detector", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The detector (.pt) whose false detections to collect.")
@click.option("--imgsz", default=None, type=int, help="Detector input size [default: the "
              "settings' (0 follows the frame)].")
def mine_cmd(dataset: str, out: str, detector: str, imgsz: int | None) -> None:
    """Hard negatives for the scorer: run DETECTOR over DATASET with the detect stage's code
    and write OUT, the same dataset (images linked) whose lines' "negatives" also hold every
    detection that matches no object (IoU < 0.3)."""
    from tqdm import tqdm

    from spotline.common.errors import SpotlineError
    from spotline.train.mine import mine

    settings = _settings()
    if imgsz is not None:
        settings = settings.replace(imgsz=imgsz)
    try:
        with tqdm(unit="img", desc="mine") as bar:
            report = mine(dataset, detector, out, settings, progress=bar.update)
    except SpotlineError as exc:
        raise _fail(exc) from None
    click.echo(f"{report.images} images, {report.detections} detections, {report.negatives} "
               f"false detections added as negatives -> {report.out}")


@data.command("check")
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--skip-bad", is_flag=True, help="Count bad records instead of stopping.")
def check_cmd(dataset: str, skip_bad: bool) -> None:
    """Check a TIL dataset: every bad record is an error naming the file and line."""
    from spotline.producer.dataset import read_dataset

    report = read_dataset(dataset, skip_bad=skip_bad)
    click.echo(report.summary())
    for example in report.examples:
        click.echo(f"  {example}")


# --- spotline finetune -------------------------------------------------------------------------
@click.group()
def finetune() -> None:
    """The seed's fine-tuning recipes: the scorer (SigLIP) and the detector (YOLO)."""


def _queue_or_run(kind: str, run: Any, queue: str | None) -> bool:
    if not queue:
        return False
    from spotline.pipeline.supervisor import running_url
    from spotline.train.jobs import enqueue_finetune

    settings = _settings()
    url = running_url(settings)
    if not url:
        raise click.ClickException("--queue needs Redis: set SPOTLINE_REDIS_URL or start "
                                   "`spotline up`")
    job = enqueue_finetune(kind, run, settings, url, queue)
    click.echo(f"queued {job.id} on {queue}: run it with `spotline jobs worker --queue {queue}`")
    return True


@finetune.command("scorer")
@click.argument("train", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--val", default=None, type=click.Path(exists=True), help="Validation dataset.")
@click.option("--base", default=None, type=click.Path(), help="A local SigLIP directory.")
@click.option("--from-scratch", is_flag=True, help="Build a small SigLIP instead (SigLIP "
              "paper init: logit scale log 10, bias -10).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=96, show_default=True, type=click.IntRange(2),
              help="Crops per micro-batch.")
@click.option("--accum", default=1, show_default=True, type=click.IntRange(1),
              help="Micro-batches per optimiser step (gradient accumulation).")
@click.option("--lr", default=None, type=float, help="[default: 2e-5, the seed's, to "
              "fine-tune; 5e-4 from scratch (measured: 2e-5 learns too slowly there)]")
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--beta2", default=0.99, show_default=True)
@click.option("--augment", "strength", default=0.25, show_default=True,
              help="Noise strength (1.0: the seed's GaussNoise variance 500-5000).")
@click.option("--jitter", default=0.1, show_default=True, help="Box jitter (fraction).")
@click.option("--background", default=0.1, show_default=True, type=click.FloatRange(0, 0.89),
              help="Share of each batch that is crops no caption names.")
@click.option("--hard-negatives", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Of those, the share cut at the lines' \"negatives\" boxes (clutter, the "
              "detector's false detections: `spotline data mine`) where a line has any.")
@click.option("--image-size", default=32, show_default=True, help="From scratch: crop side.")
@click.option("--upscaler", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Real-ESRGAN .pth: train on crops upscaled as the pipeline upscales them.")
@click.option("--resume", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue from an OUT/epoch_NNN checkpoint.")
@click.option("--threads", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip (and count) bad dataset records.")
@click.option("--queue", default=None, metavar="NAME", help="Enqueue on RQ (e.g. "
              "spotline-train) instead of running here.")
@click.option("--no-progress", is_flag=True)
def finetune_scorer_cmd(train: str, out: str, val: str | None, base: str | None,
                        from_scratch: bool, epochs: int, batch: int, accum: int,
                        lr: float | None, weight_decay: float, beta2: float, strength: float,
                        jitter: float, background: float, hard_negatives: float,
                        image_size: int, upscaler: str | None, resume: str | None,
                        threads: int, seed: int, skip_bad: bool, queue: str | None,
                        no_progress: bool) -> None:
    """Fine-tune (or train from scratch) the scorer on TRAIN's caption/crop pairs; every
    epoch writes OUT/epoch_NNN (loadable by the score stage), the last also OUT/scorer."""
    from spotline.train.scorer import ScorerRun, check_run, finetune_scorer

    run = ScorerRun(train=str(Path(train).resolve()), out=str(Path(out).resolve()),
                    val=str(Path(val).resolve()) if val else None,
                    base=str(Path(base).resolve()) if base else None,
                    from_scratch=from_scratch, epochs=epochs, batch=batch, accum=accum, lr=lr,
                    weight_decay=weight_decay, beta2=beta2, augment=strength, jitter=jitter,
                    background=background, hard_negatives=hard_negatives,
                    image_size=image_size, upscaler=upscaler, resume=resume, threads=threads,
                    seed=seed, skip_bad=skip_bad, progress=not no_progress)
    check_run(run)
    if _queue_or_run("scorer", run, queue):
        return
    result = finetune_scorer(run, _settings(), say=click.echo)
    click.echo(f"scorer: {result.final}")


@finetune.command("detector")
@click.argument("train", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--val", default=None, type=click.Path(exists=True),
              help="Validation dataset [default: the last --val-fraction of TRAIN].")
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--model", default="yolov8n.yaml", show_default=True,
              help="An architecture .yaml (from scratch), 'pico' (a narrower YOLOv8), or a "
              ".pt to fine-tune.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--imgsz", default=640, show_default=True, type=click.IntRange(32))
@click.option("--schedule", default=None, help="Image-size schedule IMGSZ:EPOCHS,... (the "
              "seed: 1280:55,1600:7); overrides --imgsz/--epochs.")
@click.option("--batch", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--noise/--no-noise", default=True, show_default=True,
              help="The seed's noise augmentations.")
@click.option("--workers", default=0, show_default=True, help="Data-loader processes.")
@click.option("--threads", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue OUT's interrupted run.")
@click.option("--skip-bad", is_flag=True, help="Skip (and count) bad dataset records.")
@click.option("--queue", default=None, metavar="NAME", help="Enqueue on RQ instead.")
def finetune_detector_cmd(train: str, out: str, val: str | None, val_fraction: float,
                          model: str, epochs: int, imgsz: int, schedule: str | None,
                          batch: int, lr: float, noise: bool, workers: int, threads: int,
                          seed: int, resume: bool, skip_bad: bool, queue: str | None) -> None:
    """Train the single-class detector on TRAIN's boxes; writes OUT/detector.pt (loadable by
    the detect stage) and reports validation mAP50."""
    from spotline.train.detector import DetectorRun, finetune_detector, parse_schedule

    run = DetectorRun(train=str(Path(train).resolve()), out=str(Path(out).resolve()),
                      val=str(Path(val).resolve()) if val else None,
                      val_fraction=val_fraction, model=model, epochs=epochs, imgsz=imgsz,
                      schedule=parse_schedule(schedule), batch=batch, lr=lr, noise=noise,
                      workers=workers, threads=threads, seed=seed, resume=resume,
                      skip_bad=skip_bad)
    if _queue_or_run("detector", run, queue):
        return
    result = finetune_detector(run, say=click.echo)
    click.echo(f"detector: {result.weights} (validation mAP50 {result.map50:.4f})")


# --- spotline models demo ----------------------------------------------------------------------
@click.command("demo")
@click.option("--retrain", is_flag=True, help="Make them again from nothing: domain-randomised "
              "synthetic scenes, both trainings side by side, the detector's false detections "
              "as the scorer's hard negatives, both accuracy figures (about 40 minutes on 2 "
              "cores).")
@click.option("--calibrate", is_flag=True, help="Only fit the scorer's calibration and \"not in "
              "view\" threshold again on the val split (about a minute), as --retrain does.")
@click.option("--measure", is_flag=True, help="Only measure the installed models again on the "
              "own test split and the held-out family, into the manifest (a few minutes).")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="Scratch folder for data and runs [default: data_dir/demo-train].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where the models go [default: models/demo in the repository].")
def models_demo(retrain: bool, calibrate: bool, measure: bool, work: str | None,
                out: str | None) -> None:
    """The demo models (models/demo/): small models trained on synthetic shapes by these
    commands. Shows how they were made and their held-out accuracy; --retrain remakes them."""
    import json

    from spotline.train import demo

    settings = _settings()
    plan = demo.DemoPlan(work=work or str(Path(settings.data_dir) / "demo-train"),
                         out=out or str(demo.DEMO_DIR))
    try:
        if retrain:
            demo.retrain(plan, settings, say=click.echo)
        elif calibrate:
            demo.recalibrate(plan, settings, say=click.echo)
        elif measure:
            demo.remeasure(plan, settings, say=click.echo)
    except (SpotlineError, RuntimeError, ValueError) as exc:
        raise _fail(exc) from None
    manifest = Path(plan.out) / demo.MANIFEST_FILE
    if not manifest.is_file():
        raise click.ClickException(f"no demo models in {plan.out}: run `spotline models demo "
                                   "--retrain`")
    info = json.loads(manifest.read_text())
    test = info["test"]
    click.echo(f"demo models in {plan.out} (settings: {Path(plan.out) / demo.SETTINGS_FILE})")
    click.echo(f"accuracy on their own renderer's held-out test split: {test['accuracy']:.4f} "
               f"on {test['captions']} captions of {test['images']} synthetic images (chance "
               f"{test['chance']:.4f})")
    family = info.get("family")
    if family:
        click.echo(f"accuracy on the held-out family (another renderer's scenes, 384-1920 px, "
                   f"never trained on): {family['accuracy']:.4f} on {family['captions']} "
                   f"captions of {family['images']} images (chance {family['chance']:.4f})")
    click.echo(f"how they were made (about {info['minutes']} minutes): {manifest}")
    click.echo(demo.NOTE)


COMMANDS = (data, finetune)
