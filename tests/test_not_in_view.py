""""Not in view" is on by default where it can be: ``not_in_view`` is auto (abstain when the
scorer has a calibration with a threshold, as the demo scorer does), true (a calibration is
required) or false (always a box)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from spotline.common.errors import ConfigError
from spotline.common.settings import Settings, load_settings, settings_env
from spotline.stages.track import Track
from spotline.stages.tracking import calibration
from spotline.stages.tracking.calibration import Calibration, abstain_threshold

ROOT = Path(__file__).resolve().parents[1]
DEMO_SCORER = ROOT / "models" / "demo" / "scorer"
FITTED = Calibration("temperature", threshold=0.4)
NO_THRESHOLD = Calibration("temperature")


def test_the_setting_is_auto_true_or_false(tmp_path):
    assert Settings().not_in_view == "auto" == load_settings(env={}).not_in_view
    for word, mode in (("true", "true"), ("1", "true"), ("on", "true"), ("FALSE", "false"),
                       ("no", "false"), ("auto", "auto")):
        assert load_settings(env={"SPOTLINE_NOT_IN_VIEW": word}).not_in_view == mode
    assert Settings(not_in_view=True).not_in_view == "true"  # a boolean as before
    assert Settings().replace(not_in_view=False).not_in_view == "false"
    toml = tmp_path / "s.toml"
    toml.write_text("not_in_view = true\n")
    assert load_settings(env={}, config_file=toml).not_in_view == "true"
    with pytest.raises(ConfigError, match="not_in_view must be auto, true or false"):
        load_settings(env={"SPOTLINE_NOT_IN_VIEW": "sometimes"})
    # a child process gets the same mode back; the default is not written out
    assert settings_env(Settings(not_in_view=False)) == {"SPOTLINE_NOT_IN_VIEW": "false"}
    assert "SPOTLINE_NOT_IN_VIEW" not in settings_env(Settings())


@pytest.mark.parametrize("mode, cal, threshold, expected", [
    ("auto", FITTED, 0.0, 0.4),  # a calibration with a threshold: abstain at it
    ("auto", FITTED, 0.25, 0.25),  # ...or at the one set
    ("auto", None, 0.25, None),  # no calibration: no probabilities, always a box
    ("auto", NO_THRESHOLD, 0.0, None),  # fitted without absent captions: always a box
    ("true", FITTED, 0.0, 0.4),
    (True, FITTED, 0.0, 0.4),
    ("false", FITTED, 0.3, None),
    (False, FITTED, 0.3, None),
])
def test_the_threshold_each_mode_gives(mode, cal, threshold, expected):
    settings = SimpleNamespace(not_in_view=mode, not_in_view_threshold=threshold)
    assert abstain_threshold(settings, cal) == expected


def test_true_without_what_it_needs_is_an_error():
    required = SimpleNamespace(not_in_view="true", not_in_view_threshold=0.0)
    with pytest.raises(ConfigError, match="calibration.json"):
        abstain_threshold(required, None)
    with pytest.raises(ConfigError, match="needs a threshold"):
        abstain_threshold(required, NO_THRESHOLD)


def test_the_demo_scorer_abstains_by_default(redis_server, settings):
    """The demo scorer ships calibration.json with fitted thresholds: the track stage
    abstains at the one fitted on clips with the default settings, and not with not_in_view
    false."""
    shipped = calibration.load(DEMO_SCORER)
    assert shipped is not None and shipped.track_threshold is not None
    demo = settings.replace(redis_url=redis_server.url, tracking=True, upscale=False,
                            scorer_dir=str(DEMO_SCORER), warmup=0)
    stage = Track(demo)
    stage.setup()
    assert stage.calibration == shipped
    assert stage.options.abstain_below == shipped.track_threshold
    off = Track(demo.replace(not_in_view=False))
    off.setup()
    assert off.calibration is None and off.options.abstain_below is None


def test_a_scorer_without_calibration_answers_every_caption_by_default(redis_server, settings):
    """Auto on a scorer with no calibration (the tiny models): the stage starts and never
    abstains; true refuses to start, naming the file it needs."""
    tiny = settings.replace(redis_url=redis_server.url, tracking=True, upscale=False, warmup=0,
                            models="tiny")
    stage = Track(tiny)
    stage.setup()
    assert stage.calibration is None and stage.options.abstain_below is None
    with pytest.raises(ConfigError, match="calibration.json"):
        Track(tiny.replace(not_in_view=True)).setup()


def test_track_mode_fits_its_own_threshold_on_clips_and_uses_it(redis_server, settings, tmp_path):
    """fit_track_threshold runs track mode (the stage's own step, in this process) over clips
    with a hidden target and a caption naming nothing, and writes track_threshold beside the
    stills' threshold; the track stage then abstains at it."""
    import dataclasses
    import json
    import shutil

    from spotline.bench.video import fit_track_threshold
    from spotline.data import synth
    from spotline.data.video import write_clips
    from spotline.train.demo import apply_demo_models

    scorer = tmp_path / "scorer"
    shutil.copytree(DEMO_SCORER, scorer)
    stills = calibration.load(scorer)
    assert stills is not None
    # the shipped one may carry a track threshold already: start from the stills' alone
    calibration.save(dataclasses.replace(stills, track_threshold=None, track_threshold_fit={}),
                     scorer)
    clips = write_clips(tmp_path / "clips", synth.SynthOptions(seed=5, size=(384, 256)),
                        clips=1, frames=12, hide=1.0)
    assert any(a["bbox"] is None for line in (clips[0] / "vlm.jsonl").read_text().splitlines()
               for a in json.loads(line)["annotations"])  # a target hidden
    demo = apply_demo_models(settings.replace(models="demo", torch_threads=1)).replace(
        scorer_dir=str(scorer))
    cal, path = fit_track_threshold(demo, tmp_path / "clips", absent=1,
                                    vocabulary=synth.all_captions())
    assert path == scorer / "calibration.json"
    loaded = calibration.load(scorer)
    assert loaded == cal and loaded.threshold == stills.threshold  # the stills' one kept
    assert loaded.track_threshold is not None and 0.0 <= loaded.track_threshold <= 1.0
    how = loaded.track_threshold_fit
    assert (how["clips"], how["frames"], how["absent_per_frame"]) == (1, 12, 1)
    assert how["absent"] >= 12  # the caption naming nothing on each frame, and the hidden ones
    stage = Track(demo.replace(redis_url=redis_server.url, tracking=True, warmup=0))
    stage.setup()
    assert stage.options.abstain_below == loaded.track_threshold
