"""What a new user meets first: spotline started from any folder finds the same models and
their exports, writes and mentions no tiny random models unless a stage runs one, warns about
nothing but the user's own input, and says its version and its effective settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.settings import load_settings, origins, shown
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import pipeline_stages
from spotline.stages import runtime
from spotline.train import demo
from tests.faultlib import wait_for

STOP_S = 30  # `up` waits up to 20 s for its workers to finish their batch


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: no SPOTLINE_* (the demo models by default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLINE_")}
    return {**env, **extra}


def spotline(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def warnings_in(text: str) -> list[str]:
    """Lines that warn: logged warnings, Python warnings, transformers' and others' notices."""
    return [line for line in text.splitlines()
            if re.search(r"warn|deprecat|tiny", line, re.IGNORECASE)]


# --- one resolution of model paths ----------------------------------------------------------
def test_model_paths_are_absolute_and_the_same_from_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged demo models resolve against the repository, a user's relative path against
    the folder they typed it in; both absolute, and nothing tiny is written for them."""
    monkeypatch.chdir(tmp_path)
    settings = demo.apply_demo_models(load_settings(env={}))
    paths = runtime.resolve_weights(settings)
    assert paths.detector == demo.DEMO_DIR / "detector.pt" and paths.detector.is_file()
    assert paths.scorer == demo.DEMO_DIR / "scorer" and paths.scorer.is_dir()
    assert not paths.tiny and not (tmp_path / ".spotline").exists()
    assert demo.is_demo(settings)
    (tmp_path / "mine").mkdir()
    shutil.copyfile(paths.detector, tmp_path / "mine" / "det.pt")
    user = settings.replace(detector_weights="mine/det.pt")
    assert runtime.resolve_weights(user).detector == tmp_path / "mine" / "det.pt"
    assert runtime.resolve_path("~/x") == Path.home() / "x"
    assert runtime.resolve_path("a/../b", base=demo.REPO) == demo.REPO / "b"
    monkeypatch.chdir(demo.REPO)  # the same demo paths from the repository root
    again = runtime.resolve_weights(demo.apply_demo_models(load_settings(env={})))
    assert (again.detector, again.scorer) == (paths.detector, paths.scorer)
    assert demo.is_demo(settings.replace(detector_weights="models/demo/detector.pt",
                                         scorer_dir="models/demo/scorer"))


def test_tiny_models_only_for_a_model_that_runs(tmp_path: Path, data_dir: Path,
                                                caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With upscaling off and the other two set, nothing is written or said; a model that
    runs without a path gets its stand-in, with a warning that names it."""
    monkeypatch.setattr(runtime, "_warned", set())  # said once per process: here, again
    settings = demo.apply_demo_models(load_settings(env={}, data_dir=str(tmp_path / "d")))
    assert runtime.used_models(settings) == ("detector", "scorer")
    with caplog.at_level("INFO"):
        paths = runtime.resolve_weights(settings)
    assert not paths.tiny and not (tmp_path / "d").exists()
    assert not [r for r in caplog.records if "tiny" in r.getMessage().lower()]
    on = settings.replace(upscale=True, data_dir=str(data_dir))  # the session's tiny models
    with caplog.at_level("INFO"):
        paths = runtime.resolve_weights(on)
    assert paths.tiny and paths.upscaler.is_file()
    assert paths.upscaler.parent == data_dir / "tiny-models"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "using tiny RANDOM models for upscaler_weights" in said


# --- the pipeline from another folder, on exports -------------------------------------------
def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        return "libtorch" in fh.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_up_outside_the_repository_runs_the_exports(tmp_path: Path) -> None:
    """The demo models copied into a project folder and exported there with `spotline
    export`; `spotline up` started in that folder (its settings file names the models by
    relative paths) runs every model stage on its export: no worker maps torch, no tiny models
    are written, and nothing warns."""
    home = tmp_path / "project"
    models = home / "models" / "demo"
    models.mkdir(parents=True)
    shutil.copyfile(demo.DEMO_DIR / "detector.pt", models / "detector.pt")
    shutil.copytree(demo.DEMO_DIR / "scorer", models / "scorer")
    shutil.copyfile(demo.DEMO_DIR / demo.SETTINGS_FILE, models / demo.SETTINGS_FILE)
    env = clean_env(SPOTLINE_CONFIG="models/demo/settings.toml",
                    SPOTLINE_NAMESPACE=f"fr{uuid.uuid4().hex[:8]}")
    out = spotline("export", "--engine", "openvino", "--precision", "fp32", cwd=home, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "upscaler" not in out.stdout, out.stdout  # upscaling is off: nothing to export
    assert (models / "detector.pt.export").is_dir() and (models / "scorer.export").is_dir()
    log = tmp_path / "up.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spotline", "up"], cwd=home, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        up_file = home / ".spotline" / "up.json"
        wait_for(lambda: up_file.exists() or proc.poll() is not None, 120, "up.json")
        assert proc.poll() is None, log.read_text()
        settings = load_settings(env={}, namespace=env["SPOTLINE_NAMESPACE"], upscale=False)
        t = Transport(settings, url=json.loads(up_file.read_text())["url"])
        try:
            for stage in pipeline_stages(settings):
                wait_for(lambda st=stage: t.workers_alive(st) >= 1 or proc.poll() is not None,
                         300, f"{stage} ready", every=0.2)
        finally:
            t.close()
        assert proc.poll() is None, log.read_text()
        workers = {" ".join(c.cmdline()).split("worker ")[-1]: c.pid
                   for c in psutil.Process(proc.pid).children(recursive=True)
                   if "spotline worker" in " ".join(c.cmdline())}
        assert set(workers) == {"detect", "score", "collect"}, workers
        assert {stage: _maps_torch(pid) for stage, pid in workers.items()} == {
            "detect": False, "score": False, "collect": False}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=STOP_S) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert not warnings_in(text), text[-3000:]
    assert not (home / ".spotline" / "tiny-models").exists()


# --- no warnings at start ---------------------------------------------------------------------
SCORER_LOADS = """
import shutil, sys, json
from pathlib import Path
from spotline.stages.score import load_scorer
load_scorer(sys.argv[1])
print("--- a config of our own with a bos id outside its vocabulary", file=sys.stderr, flush=True)
bad = Path(sys.argv[2])
shutil.copytree(sys.argv[1], bad)
config = json.loads((bad / "config.json").read_text())
config["text_config"]["bos_token_id"] = 500
(bad / "config.json").write_text(json.dumps(config))
load_scorer(bad)
"""


def test_the_demo_scorer_loads_without_warnings(tmp_path: Path) -> None:
    """Loading the demo SigLIP says nothing (transformers warned twice about its own default
    config on every load); a config that is really wrong still gets its warning."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCORER_LOADS),
                          str(demo.DEMO_DIR / "scorer"), str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, env=clean_env(),
                         check=True)
    first, _, second = out.stderr.partition("--- a config of our own")
    assert not warnings_in(first) and "Loading weights" not in first, first
    assert "bos_token_id must be `None` or an integer within the vocabulary" in second, second
    assert "got 500" in second and "got 49406" not in out.stderr


def test_spotline_demo_from_another_folder_says_no_warning(tmp_path: Path) -> None:
    """A new user's `spotline demo` (what `make demo` runs), from a folder of their own: it
    grounds the demo scenes, warns about nothing and writes no tiny models."""
    out = spotline("demo", cwd=tmp_path, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RIGHT" in out.stdout and "these are the demo models" in out.stdout
    assert not warnings_in(out.stderr), out.stderr[-3000:]
    assert not (tmp_path / ".spotline" / "tiny-models").exists()


# --- --version and `spotline config` ----------------------------------------------------------
def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"spotline {version('spotline')}")
    broken = CliRunner().invoke(cli, ["--version"], env={"SPOTLINE_IMGSZ": "not a number"})
    assert broken.exit_code == 0  # answered before any settings are read


def test_config_shows_values_sources_and_masks_secrets(tmp_path: Path) -> None:
    settings_file = tmp_path / "mine.toml"
    settings_file.write_text('namespace = "fromfile"\nconf = 0.25\n')
    env = {"SPOTLINE_MODELS": "demo", "SPOTLINE_CONF": "0.3",
           "SPOTLINE_REDIS_URL": "redis://app:hunter2@db:6379/0",
           "SPOTLINE_API_KEYS": "key-one,key-two"}
    result = CliRunner().invoke(cli, ["--config", str(settings_file), "--log-level", "WARNING",
                                      "config", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["settings"]
    assert rows["namespace"] == {"value": "fromfile", "source": f"file {settings_file.resolve()}",
                                 "env": "SPOTLINE_NAMESPACE", "default": "spotline",
                                 "help": rows["namespace"]["help"]}
    assert (rows["conf"]["value"], rows["conf"]["source"]) == (0.3, "env SPOTLINE_CONF")
    assert rows["log_level"]["source"] == "option --log-level"
    assert rows["max_det"]["source"].startswith("demo models ")  # the demo models' settings
    assert rows["detector_weights"]["value"] == str(demo.DEMO_DIR / "detector.pt")
    assert rows["redis_url"]["value"] == "redis://app:***@db:6379/0"
    assert rows["api_keys"]["value"] == "***"
    assert rows["rate_burst"]["source"] == "default"
    assert "hunter2" not in result.output and "key-one" not in result.output
    text = CliRunner().invoke(cli, ["config"], env=env)
    assert text.exit_code == 0, text.output
    assert 'redis_url = "redis://app:***@db:6379/0"  # env SPOTLINE_REDIS_URL' in text.output
    assert "hunter2" not in text.output
    assert text.output.startswith("# spotline ")


def test_origins_and_shown() -> None:
    assert origins(env={"SPOTLINE_TTA": "0"}, imgsz=640)["tta"] == "env SPOTLINE_TTA"
    assert origins(env={}, imgsz=640)["imgsz"] == "option --imgsz"
    assert origins(env={})["conf"] == "default"
    assert shown("api_keys_file", "/etc/keys") == "/etc/keys"  # a path, not a secret
    assert shown("sink_token", "abc") == "***"
    assert shown("feed_roots", "rtsp://u:pw@cam/live?token=t") == "rtsp://u:***@cam/live?token=***"
