"""Track mode on the command line: `spotline bench video CLIPS` (its options are in
cli/bench.py), `spotline eval DATASET --calibrate` / `--grounding`, and `spotline calibrate
DATASET` (the same fit on its own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from spotline.common.errors import SpotlineError
from spotline.common.settings import Settings


def video_bench(settings: Settings, clips: str, max_clips: int, frames: int, absent: int,
                json_path: str | None, in_process: bool = False,
                real: bool = False) -> dict[str, Any]:
    """`spotline bench video`: both modes on the same clips through the streaming pipeline
    (and in this process with ``in_process``); prints the table. ``real``: the settings carry
    the real-size random architectures, and the report says so."""
    from spotline.bench import video as videobench
    from spotline.data.synth import all_captions

    report = videobench.video_bench(settings, clips, max_clips=max_clips, max_frames=frames,
                                    absent=absent,
                                    abstain_below=settings.not_in_view_threshold or None,
                                    vocabulary=all_captions(), in_process=in_process)
    report["real_size"] = real
    click.echo(videobench.table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
    return report


def fit_and_save(settings: Settings, dataset: str, method: str, limit: int | None,
                 absent: int = 1, target_precision: float = 0.9) -> None:
    """Fit the scorer's calibration on a labelled TIL dataset and write it beside the scorer."""
    from spotline.eval.grounding import fit_calibration
    from spotline.producer.dataset import load_til

    try:
        cal, path = fit_calibration(settings, load_til(dataset)[:limit], method, absent=absent,
                                    target_precision=target_precision)
    except (SpotlineError, ValueError) as exc:
        raise click.ClickException(f"cannot calibrate: {exc}") from None
    what = (f"temperature {cal.temperature:.3f}, bias {cal.bias:.3f}" if cal.method ==
            "temperature" else f"{len(cal.knots_x)} knots")
    click.echo(f"calibration ({cal.method}: {what}; {cal.fitted_on} caption×box pairs, "
               f"NLL {cal.nll:.4f}) written to {path}")
    if cal.threshold is not None:
        fit = cal.threshold_fit
        click.echo(f"not in view: abstain under P(in view) {cal.threshold:.3f} (abstentions "
                   f"precision {fit['precision']:.3f}, recall {fit['recall']:.3f} on these "
                   f"{fit['captions']} captions, {fit['absent']} naming nothing; target "
                   f"precision {fit['target_precision']})")


def grounding_lines(settings: Settings, dataset: str, limit: int | None, absent: int) -> None:
    """eval's lines for joint assignment and "not in view" (with the scorer's calibration)."""
    from spotline.eval.grounding import grounding_report, report_lines, score_dataset
    from spotline.producer.dataset import load_til
    from spotline.stages import runtime
    from spotline.stages.tracking import calibration

    cal = calibration.load(runtime.resolve_weights(settings).scorer)
    if cal is None:
        click.echo("(no calibration.json beside the scorer: `--calibrate` fits one; "
                   "\"not in view\" is left out)", err=True)
    scored = score_dataset(settings, load_til(dataset)[:limit], absent=absent if cal else 0)
    report = grounding_report(scored, cal, abstain_below=settings.not_in_view_threshold or None)
    for line in report_lines(report):
        click.echo(line)


@click.command("calibrate")
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--method", type=click.Choice(["temperature", "isotonic"]),
              default="temperature", show_default=True, help="How scores become probabilities.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--absent", type=click.IntRange(0), default=1, show_default=True,
              help="Captions per image naming nothing in it, for \"not in view\" (0: none).")
@click.option("--target-precision", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True, help="\"Not in view\" threshold: the one reaching this "
              "abstention precision on DATASET.")
def calibrate(dataset: str, method: str, limit: int | None, absent: int,
              target_precision: float) -> None:
    """Fit the scorer's calibration on a labelled TIL DATASET (the same as `spotline eval
    DATASET --calibrate`): writes calibration.json beside the scorer, which "not in view"
    (the not_in_view setting, track mode) needs. Use a validation split, not the test split."""
    from spotline.cli.context import current

    fit_and_save(current().settings, dataset, method, limit, absent, target_precision)


def _root_settings() -> Settings:
    from spotline.cli.context import current

    return current().settings


def add_grounding_options(command: Any) -> Any:
    """Give the `eval` click command ``--calibrate`` (fit the scorer's calibration on DATASET,
    write it beside the scorer) and ``--grounding`` (lines for one box per caption and "not in
    view"). Registered with one line where the CLI adds eval."""
    import functools

    command.params += [
        click.Option(["--calibrate"], is_flag=True,
                     help="Fit the scorer's calibration on DATASET and write calibration.json "
                     "beside the scorer (\"not in view\" needs it), then stop unless "
                     "--grounding is given too."),
        click.Option(["--calibration-method"], type=click.Choice(["temperature", "isotonic"]),
                     default="temperature", show_default=True, help="With --calibrate."),
        click.Option(["--grounding"], is_flag=True,
                     help="Also print accuracy with each caption's argmax and with one box per "
                     "caption, and (with a calibration) \"not in view\" precision and recall "
                     "over --absent captions per image that name nothing in it."),
        click.Option(["--absent"], type=click.IntRange(0), default=1, show_default=True,
                     help="With --grounding or --calibrate: such captions per image."),
        click.Option(["--target-precision"], type=click.FloatRange(0, 1, min_open=True),
                     default=0.9, show_default=True,
                     help="With --calibrate: the \"not in view\" threshold is the one reaching "
                     "this abstention precision on DATASET."),
    ]
    original = command.callback

    @functools.wraps(original)
    def callback(*args: Any, calibrate: bool = False, calibration_method: str = "temperature",
                 grounding: bool = False, absent: int = 1, target_precision: float = 0.9,
                 **kwargs: Any) -> Any:
        settings = _root_settings()
        dataset, limit = kwargs["dataset"], kwargs.get("limit")
        if calibrate:
            fit_and_save(settings, dataset, calibration_method, limit, absent, target_precision)
            if not grounding:
                return None
        else:
            original(*args, **kwargs)
        if grounding:
            grounding_lines(settings, dataset, limit, absent)
        return None

    command.callback = callback
    return command
