"""`spotline demo`: run the whole pipeline on ultralytics' two bundled photos and show it."""

from __future__ import annotations

import time
from pathlib import Path

import click

from spotline.common.envelope import Result
from spotline.common.settings import Settings
from spotline.eval import iou_ltwh
from spotline.results.annotate import write_annotated

DEMO_FRAMES = {
    "bus.jpg": ("blue and white bus", "man in a dark jacket", "woman on the left"),
    "zidane.jpg": ("man in a red tie", "bald man in a suit", "green background"),
}

TINY_NOTE = (
    "NOTE: no model weights are configured, so spotline ran on tiny RANDOM-initialised models:\n"
    "the pipeline, transport and formats are real, but the boxes above are arbitrary.\n"
    "Point spotline at real weights (see README, 'Real models'):\n"
    "  SPOTLINE_DETECTOR_WEIGHTS=/models/yolov9e.pt\n"
    "  SPOTLINE_UPSCALER_WEIGHTS=/models/realesr-general-x4v3.pth\n"
    "  SPOTLINE_SCORER_DIR=/models/siglip-large-patch16-384")


# name -> ground truth [(caption, [l, t, w, h])] of the synthetic demo scenes
SCENE_TRUTH: dict[str, list[tuple[str, list[int]]]] = {}


def synthetic_frames() -> dict[str, bytes]:
    """Three synthetic scenes (made on the fly, always the same), their captions and truth."""
    from spotline.train.demo import demo_scenes

    frames = {}
    for name, data, truth in demo_scenes(3):
        frames[name] = data
        DEMO_FRAMES[name] = tuple(c for c, _ in truth)
        SCENE_TRUTH[name] = truth
    return frames


def demo_images() -> dict[str, bytes]:
    """The two real photos that ultralytics ships."""
    from spotline.stages.libs import ultralytics_assets

    assets = ultralytics_assets()
    return {name: (assets / name).read_bytes() for name in DEMO_FRAMES if name in _PHOTOS}


_PHOTOS = ("bus.jpg", "zidane.jpg")


def using_tiny_models(settings: Settings) -> bool:
    return not (settings.detector_weights and settings.scorer_dir and
                (settings.upscaler_weights or not settings.upscale))


def run_demo(settings: Settings, url: str | None, out_dir: Path, timeout: float) -> list[Result]:
    """Publish the demo frames to a pipeline (a local one unless ``url``), print the results
    and write annotated images to ``out_dir``. With the demo models (models/demo/), the frames
    are synthetic scenes of coloured shapes, each caption checked against its true box."""
    from spotline.pipeline.supervisor import LocalPipeline
    from spotline.train.demo import apply_demo_models, is_demo

    settings = apply_demo_models(settings)
    images = demo_images()
    if is_demo(settings):
        images = synthetic_frames()
    if url is None:
        click.echo("starting a local pipeline (embedded redis-server, one worker per stage)...")
        quiet = settings.replace(log_level="WARNING") if settings.log_level == "INFO" else settings
        with LocalPipeline(quiet) as local_url:
            return _publish_and_show(settings, local_url, images, out_dir, timeout)
    return _publish_and_show(settings, url, images, out_dir, timeout)


def _publish_and_show(settings: Settings, url: str, images: dict[str, bytes], out_dir: Path,
                      timeout: float) -> list[Result]:
    from spotline.producer.client import Client

    client = Client.connect(url, settings)
    t0 = time.monotonic()
    ids = {client.publish(img, DEMO_FRAMES[name], source_id="demo"): name
           for name, img in images.items()}
    results = client.await_results(ids, timeout=timeout)
    click.echo(f"{len(results)} results in {time.monotonic() - t0:.2f}s\n")
    for fid, name in ids.items():
        res = results[fid]
        path = write_annotated(images[name], res, out_dir, Path(name).stem)
        status = f"ERROR {res.error}" if res.error else ("no boxes: fallback" if res.fallback
                                                          else "ok")
        click.echo(f"{name}  frame {fid}  {status}  -> {path}")
        truth = dict(SCENE_TRUTH.get(name, []))
        for caption, box, score in zip(res.captions, res.boxes, res.scores, strict=True):
            check = ""
            if caption in truth:
                iou = iou_ltwh(box, truth[caption])
                check = f"  {'RIGHT' if iou > 0.5 else 'WRONG'} (IoU {iou:.2f} with the true box)"
            click.echo(f"  {caption!r:<28} [l, t, w, h] = {[round(v, 1) for v in box]}"
                       f"  score {score:.4f}{check}")
        stages = ", ".join(f"{s} {1000 * (end - start):.0f} ms" for s, _q, start, end in res.trace)
        click.echo(f"  stages: {stages}; end to end {1000 * res.latency:.0f} ms\n")
    client.close()
    if any(name in SCENE_TRUTH for name in ids.values()):
        from spotline.train.demo import NOTE

        click.echo(NOTE)
    elif using_tiny_models(settings):
        click.echo(TINY_NOTE)
    return [results[f] for f in ids]
