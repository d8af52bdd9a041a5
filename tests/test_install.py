"""Installs like a user's, from the lock files (docs/install.md): fresh venvs of the core, then
core + [openvino] with no torch in them, running `spotline up` on the demo models exported (by
this, the full, install) to OpenVINO, answering the demo scenes as the full install does, no
process mapping torch, the venv and every worker within their targets; then the edge role
(+ ONNX Runtime). Also: the lock files agree with each other and with pyproject.toml, numpy's
Hungarian picks what scipy's does, and a missing library is one line naming the extra to add.

The venvs install with pip's cache (a few minutes the first time, mostly downloads); the
figures are printed (pytest -s) for docs/install.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from spotline.common.extras import EXTRAS, missing_extra, stage_missing_extra
from spotline.common.settings import Settings, load_settings
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import pipeline_stages
from tests.conftest import ROOT
from tests.faultlib import wait_for

LOCK = ROOT / "requirements"
VENV_MAX_MIB = 600  # core + [openvino], as `du -sm` counts
WORKER_MAX_MIB = 350  # resident, every worker, with the exported demo models
SOURCES = ("pyproject.toml", "README.md", "spotline", "common", "stages", "producer")
INSTALL_TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc for each worker's memory and mappings")


def _run(args: list[str | Path], timeout: float = INSTALL_TIMEOUT_S, **kw: object
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _pip(venv: Path, *args: str | Path) -> None:
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", *args])


def du_mib(path: Path) -> float:
    """Disk usage under ``path`` in MiB, as `du -sm` counts it (blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    blocks = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                blocks += st.st_blocks
    return blocks * 512 / 2**20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's files a wheel is built from, copied out of the tree (a build there would
    leave build/ behind, and could race another one)."""
    dst = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    """A fresh venv of the core role: requirements/core.txt (every file hash-checked, nothing
    else), then spotline itself without dependencies."""
    venv = tmp_path_factory.mktemp("light") / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _pip(venv, "--require-hashes", "--no-deps", "-r", LOCK / "core.txt")
    _pip(venv, "--no-deps", source)
    return venv


def _python(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, timeout=120, cwd=venv)


def test_core_role_runs_the_gateway_collector_sinks_and_feeds(core_venv: Path) -> None:
    """The core install imports what the gateway, collect, sinks, feeds and the client run, has
    no model framework, and its requirements hold together."""
    _run([core_venv / "bin" / "python", "-m", "pip", "check"])
    mods = ("spotline.producer.gateway", "spotline.producer.sinks", "spotline.producer.sources",
            "spotline.producer.client", "spotline.common.collector",
            "spotline.stages.tracking.grounding", "spotline.stages.track", "spotline.cli")
    ok = _python(core_venv, "import importlib\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in mods))
    assert ok.returncode == 0, ok.stderr
    for framework in ("torch", "openvino", "onnxruntime", "scipy", "ultralytics",
                      "transformers"):
        probe = _python(core_venv, f"import {framework}")
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, framework
    print(f"\ncore venv: {du_mib(core_venv):.0f} MiB")


@pytest.fixture(scope="module")
def light_venv(core_venv: Path) -> Path:
    """core + [openvino]: requirements/openvino.txt over the core venv (adds OpenVINO only)."""
    _pip(core_venv, "--require-hashes", "--no-deps", "-r", LOCK / "openvino.txt")
    _run([core_venv / "bin" / "python", "-m", "pip", "check"])
    return core_venv


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models copied out of the tree and exported to OpenVINO fp32 by this (the full)
    install; a settings file that runs them: the demo's settings, the exports' backend."""
    from spotline.export import export_model

    root = tmp_path_factory.mktemp("demo-models")
    demo = ROOT / "models" / "demo"
    shutil.copy2(demo / "detector.pt", root / "detector.pt")
    shutil.copytree(demo / "scorer", root / "scorer")
    export_model("detector", root / "detector.pt", ("openvino",), ("fp32",))
    export_model("scorer", root / "scorer", ("openvino",), ("fp32",))
    lines = [line for line in (demo / "settings.toml").read_text().splitlines()
             if line.strip() and not line.startswith("#")
             and not line.startswith(("detector_weights", "scorer_dir"))]
    lines += [f'detector_weights = "{root / "detector.pt"}"', f'scorer_dir = "{root / "scorer"}"',
              'backend = "openvino"', 'export_precision = "fp32"']
    (root / "settings.toml").write_text("\n".join(lines) + "\n")
    return root


class LightUp:
    """`spotline up` of the light venv, in its own process group, outside the source tree."""

    def __init__(self, venv: Path, config: Path, tmp: Path) -> None:
        self.settings = load_settings(env={}, config_file=str(config), data_dir=str(tmp / "data"),
                                      namespace=f"inst{uuid.uuid4().hex[:8]}")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SPOTLINE_", "PYTHON", "VIRTUAL_ENV"))}
        self.env.update(SPOTLINE_CONFIG=str(config), SPOTLINE_DATA_DIR=self.settings.data_dir,
                        SPOTLINE_NAMESPACE=self.settings.namespace, SPOTLINE_LOG_LEVEL="INFO")
        self.venv, self.cwd, self.log = venv, tmp, tmp / "up.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(venv / "bin" / "spotline"), "up"], env=self.env,
                                         cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        up_file = Path(self.settings.data_dir) / "up.json"
        wait_for(lambda: up_file.exists() or self.proc.poll() is not None, 120, "up.json")
        assert self.proc.poll() is None, self.text()
        self.url = json.loads(up_file.read_text())["url"]
        t = Transport(self.settings, url=self.url)
        try:
            for stage in pipeline_stages(self.settings):
                wait_for(lambda st=stage: t.workers_alive(st) >= 1 or self.proc.poll() is not None,
                         300, f"{stage} worker ready", every=0.2)
        finally:
            t.close()
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> dict[str, psutil.Process]:
        """stage -> its worker process (`spotline worker STAGE`)."""
        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = child.cmdline()
            if "worker" in cmd:
                out[cmd[cmd.index("worker") + 1]] = child
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def light_up(light_venv: Path, demo_exports: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightUp]:
    up = LightUp(light_venv, demo_exports / "settings.toml", tmp_path_factory.mktemp("up"))
    yield up
    up.stop()


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _answers(results: list) -> list[list[tuple[str, list[float], float]]]:
    return [[(c, list(b), float(s)) for c, b, s in zip(r.captions, r.boxes, r.scores,
                                                       strict=True)] for r in results]


def test_light_install_answers_the_demo_scenes_without_torch(light_up: LightUp,
                                                             light_venv: Path,
                                                             demo_exports: Path) -> None:
    """core + [openvino]: no torch to import, `spotline up` answers the three demo scenes as
    the full install does (on the same exports, and on the checkpoints with torch: the same
    boxes), no process maps torch, the venv <= 600 MiB and every worker <= 350 MiB."""
    from spotline.pipeline.reference import Reference
    from spotline.producer.client import Client
    from spotline.train.demo import demo_scenes

    probe = _python(light_venv, "import torch")
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    scenes = demo_scenes(3)
    client = Client.connect(light_up.url, light_up.settings)
    try:
        ids = [client.publish(data, tuple(c for c, _ in truth), source_id="install")
               for _name, data, truth in scenes]
        got = client.await_results(ids, timeout=300)
    finally:
        client.close()
    streamed = [got[fid] for fid in ids]
    assert not any(r.error for r in streamed), [r.error for r in streamed]

    images = [data for _n, data, _t in scenes]
    captions = [tuple(c for c, _ in truth) for _n, _d, truth in scenes]
    full: Settings = light_up.settings
    for backend, box_tol, score_tol in (("openvino", 0.01, 1e-4), ("torch", 0.5, 2e-3)):
        reference = Reference(full.replace(backend=backend)).identify(images, captions)
        for light, ref in zip(_answers(streamed), _answers(reference), strict=True):
            assert [c for c, _, _ in light] == [c for c, _, _ in ref]
            np.testing.assert_allclose([b for _, b, _ in light], [b for _, b, _ in ref],
                                       atol=box_tol, rtol=0, err_msg=backend)
            np.testing.assert_allclose([s for _, _, s in light], [s for _, _, s in ref],
                                       atol=score_tol, rtol=0, err_msg=backend)

    workers = light_up.workers()
    assert set(workers) == set(pipeline_stages(light_up.settings)), light_up.text()
    processes = [psutil.Process(light_up.proc.pid), *workers.values()]
    for proc in processes:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps, proc.cmdline()
    size = du_mib(light_venv)
    lines = [f"core + [openvino] venv: {size:.0f} MiB"]
    for stage, proc in sorted(workers.items()):
        mem = _status(proc.pid)
        lines.append(f"worker {stage}: RSS {mem['VmRSS'] / 1024:.0f} MiB, "
                     f"peak {mem['VmHWM'] / 1024:.0f} MiB")
        assert mem["VmRSS"] <= WORKER_MAX_MIB * 1024, lines[-1]
    print("\n" + "\n".join(lines))
    assert size <= VENV_MAX_MIB, lines[0]


def test_a_missing_framework_names_the_extra_in_one_line(light_up: LightUp,
                                                         light_venv: Path) -> None:
    """A detect worker of the light install on the .pt checkpoint itself (backend torch) stops
    with one line: which library, and which extra brings it."""
    env = {**light_up.env, "SPOTLINE_BACKEND": "torch", "SPOTLINE_REDIS_URL": light_up.url}
    proc = subprocess.run([str(light_venv / "bin" / "spotline"), "worker", "detect", "--burst"],
                          env=env, cwd=light_up.cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("Error: the detect stage on detector.pt needs "), errors[0]
    assert "pip install 'spotline[torch]'" in errors[0], errors[0]


def test_edge_role_adds_onnx_runtime(light_up: LightUp, light_venv: Path) -> None:
    """The edge role (core + [openvino] + [onnx], the `edge` image): requirements/edge.txt
    over the same venv holds together and imports both runtimes, still without torch."""
    _pip(light_venv, "--require-hashes", "--no-deps", "-r", LOCK / "edge.txt")
    _run([light_venv / "bin" / "python", "-m", "pip", "check"])
    ok = _python(light_venv, "import onnxruntime, openvino, spotline.stages.backends.engine")
    assert ok.returncode == 0, ok.stderr
    assert _python(light_venv, "import torch").returncode != 0
    print(f"\nedge venv (core + [openvino] + [onnx]): {du_mib(light_venv):.0f} MiB")


def test_numpy_hungarian_picks_what_scipy_picks() -> None:
    """stages/tracking/lsap.py against scipy's, maximising and minimising, on wide, tall and square
    matrices, with ties (small integers) and without."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    from spotline.stages.tracking.lsap import linear_sum_assignment

    rng = np.random.default_rng(24)
    for trial in range(600):
        rows, cols = (int(v) for v in rng.integers(1, 9, 2))
        cost = (rng.integers(0, 4, (rows, cols)).astype(float) if trial % 2
                else rng.normal(size=(rows, cols)))
        for maximize in (False, True):
            want = scipy_lsa(cost, maximize=maximize)
            got = linear_sum_assignment(cost, maximize=maximize)
            assert [list(g) for g in got] == [list(w) for w in want], (cost, maximize)
    empty = linear_sum_assignment(np.zeros((0, 3)))
    assert [len(e) for e in empty] == [0, 0]
    with pytest.raises(ValueError):
        linear_sum_assignment(np.array([[0.0, np.nan]]))


def test_every_optional_library_names_its_extra() -> None:
    """Each library left out of the core maps to an extra pyproject.toml declares, and the line
    a command or a stage gives names it."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
    for name in ("all", "openvino", "onnx", "torch", "realesrgan", "export", "train", "bench",
                 "mqtt", "test"):
        assert name in extras, name
    error = missing_extra(ModuleNotFoundError("No module named 'paho'", name="paho.mqtt"),
                          "spotline sink")
    assert str(error) == ("spotline sink needs paho, which this install lacks: "
                          "pip install 'spotline[mqtt]'")
    assert missing_extra(ModuleNotFoundError(name="no_such_thing"), "x") is None
    settings = load_settings(env={}, detector_weights="/m/yolo.pt")
    line = str(stage_missing_extra(ModuleNotFoundError(name="ultralytics"), "detect", settings))
    assert line.startswith("the detect stage on yolo.pt needs ultralytics")
    assert "pip install 'spotline[torch]'" in line and "\n" not in line


def _pins(path: Path) -> dict[str, set[str]]:
    """name -> the versions a lock file pins it at (one per environment marker), and checks
    that every pin carries hashes and no local path."""
    import re

    pins: dict[str, set[str]] = {}
    text = path.read_text()
    assert "file:" not in text and "/opt/" not in text and "/work/" not in text, path
    for entry in re.split(r"\n(?=\S)", text):
        line = entry.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        assert match, (path.name, line[:80])
        assert "--hash=sha256:" in entry, (path.name, match.group(1))
        pins.setdefault(match.group(1).lower(), set()).add(match.group(2))
    return pins


def test_lock_files_agree_with_each_other_and_pyproject() -> None:
    """Every role's lock pins what lock.txt ([all]) pins, with hashes and no local path; every
    dependency pyproject.toml declares is in lock.txt; the core and light roles hold no model
    framework, and full.txt no torch or CUDA library (its image adds torch's CPU build).
    Fails when pyproject.toml changed and `make lock` was not run."""
    import re
    import tomllib

    whole = _pins(LOCK / "lock.txt")
    for name in ("build", "torch", "core", "openvino", "edge", "gpu", "full"):
        role = _pins(LOCK / f"{name}.txt")
        for package, versions in role.items():
            if name == "build" and package not in whole:
                continue  # cython: basicsr's build needs it, nothing at run time
            assert versions <= whole.get(package, set()), (name, package, versions)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [
        dep for deps in project["optional-dependencies"].values() for dep in deps]
    for dep in declared:
        package = re.match(r"[A-Za-z0-9_.-]+", dep).group().lower()  # type: ignore[union-attr]
        if package != "spotline":
            assert package in whole, f"{package} is not in requirements/lock.txt: make lock"
    frameworks = {"torch", "torchvision", "ultralytics", "transformers", "scipy"}
    for name in ("core", "openvino", "edge"):
        assert not frameworks & set(_pins(LOCK / f"{name}.txt")), name
    full = set(_pins(LOCK / "full.txt"))
    assert not {"torch", "torchvision", "triton"} & full
    assert not [p for p in full if p.startswith("nvidia-cu") or p.startswith("cuda-")]
    assert {"ultralytics", "transformers", "openvino", "onnxruntime", "basicsr"} <= full
