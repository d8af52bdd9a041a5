"""deploy/ and the compose files: valid against their schemas and tools, consistent with the code.

- docker-compose.yml and docker-compose.gpu.yml against the Compose Specification JSON schema;
- deploy/prometheus/prometheus.yml through `promtool check config`;
- the Grafana dashboard: valid JSON, and every metric and label its queries use is one that
  spotline.common.metrics exports;
- every spotline service's command, run for real outside Docker against a real Redis: it must
  serve /metrics and exit 0 on SIGTERM, as `docker compose stop` expects.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.metrics import Metrics
from spotline.common.settings import STAGES, load_settings
from spotline.producer.sinks import SinkMetrics
from spotline.stages import STAGE_CLASSES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SPEC = Path(__file__).resolve().parents[2] / "shared" / "compose-spec.json"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "spotline.json"

METRICS_PORT = "9100"
HTTP_PORT = "5004"
GATEWAY = "gateway"
MODEL_ENV = ("SPOTLINE_DETECTOR_WEIGHTS", "SPOTLINE_UPSCALER_WEIGHTS", "SPOTLINE_SCORER_DIR")
# Which model each stage needs, and the variable that points at it in the container.
STAGE_MODEL_ENV = {"detect": MODEL_ENV[0], "upscale": MODEL_ENV[1], "score": MODEL_ENV[2]}
GPU_STAGES = ("detect", "upscale", "score")
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed: `make tools` installs it (Debian's prometheus package)"


def promtool() -> str:
    """promtool, or a failure: a skip would hide that the config was never checked."""
    if PROMTOOL is None:
        pytest.fail(NO_PROMTOOL)
    return PROMTOOL


# --- compose helpers ------------------------------------------------------------------------
def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def compose_merge(base: Any, override: Any) -> Any:
    """Merge an override file into a base file as `docker compose -f a -f b` does for
    mappings (key by key, recursively); any other value of the override replaces the base's.
    (Compose also unions a few sequences such as ports; these files do not rely on that.)"""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = compose_merge(base[key], value) if key in base else value
        return merged
    return override


def env_dict(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolated(env: dict[str, str], secret: str = "test-secret") -> dict[str, str]:
    """Values as compose hands them to the container: ``${VAR:-default}`` → default (VAR unset),
    ``${VAR:?message}`` (a required secret) → ``secret``."""
    def one(value: str) -> str:
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
        return re.sub(r"\$\{\w+:\?[^}]*\}", secret, value)
    return {k: one(v) for k, v in env.items()}


def spotline_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the spotline image (built from deploy/Dockerfile)."""
    return {name: svc for name, svc in compose["services"].items()
            if "build" in svc or str(svc.get("image", "")).startswith("spotline")}


BASE = load_yaml(COMPOSE)
GPU = load_yaml(COMPOSE_GPU)
MERGED = compose_merge(BASE, GPU)
SPOTLINE = spotline_services(BASE)


# --- (a) compose files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_validator() -> Any:
    if not COMPOSE_SPEC.is_file():
        pytest.skip(f"Compose Specification schema not found at {COMPOSE_SPEC}")
    import jsonschema

    schema = json.loads(COMPOSE_SPEC.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)  # the specification is written in draft-07
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name,doc", [("docker-compose.yml", BASE),
                                      ("docker-compose.gpu.yml", GPU),
                                      ("docker-compose.yml + docker-compose.gpu.yml", MERGED)])
def test_compose_matches_compose_spec(compose_validator: Any, name: str,
                                      doc: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in compose_validator.iter_errors(doc)]
    assert not errors, f"{name} does not match the Compose Specification:\n" + "\n".join(errors)
    assert "version" not in doc, f"{name}: `version` is obsolete in the Compose Specification"


def test_compose_has_the_pipeline() -> None:
    services = BASE["services"]
    assert set(SPOTLINE) == {*STAGES, GATEWAY}
    assert {"redis", "prometheus", "grafana"} <= set(services)
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["command"][redis["command"].index("--appendfsync") + 1] == "everysec"
    assert "healthcheck" in redis
    for stage in STAGES:
        assert services[stage]["command"] == ["worker", stage, "--metrics-port", METRICS_PORT]
    assert services[GATEWAY]["command"] == ["serve", "--port", HTTP_PORT,
                                            "--metrics-port", METRICS_PORT]
    assert f"{HTTP_PORT}:{HTTP_PORT}" in services[GATEWAY]["ports"]


# Redis needs a password, from REDIS_PASSWORD (.env); compose refuses to start without it.
REDIS_PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@redis:6379/0"


def test_compose_secrets_come_from_the_environment() -> None:
    services = BASE["services"]
    redis = services["redis"]
    conf = redis["command"][1]
    assert [c["target"] for c in redis["configs"]] == [conf]  # requirepass from a file ...
    (source,) = [c["source"] for c in redis["configs"]]
    assert BASE["configs"][source]["content"].strip() == f"requirepass {REDIS_PASSWORD}"
    assert not any("requirepass" in str(arg) for arg in redis["command"])  # ... not argv
    assert env_dict(redis)["REDISCLI_AUTH"] == REDIS_PASSWORD  # the healthcheck's ping
    grafana = env_dict(services["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    text = COMPOSE.read_text(encoding="utf-8")
    assert "admin:admin" not in text and "GF_SECURITY_ADMIN_PASSWORD: admin" not in text


def test_gateway_healthcheck_is_readiness() -> None:
    """Healthy means ready: Redis answers and every stage has a live worker (GET /ready)."""
    gateway = BASE["services"][GATEWAY]
    assert "/ready" in " ".join(gateway["healthcheck"]["test"])
    # keys required: the container listens beyond loopback, where an open gateway won't serve
    assert env_dict(gateway)["SPOTLINE_API_KEYS"].startswith("${SPOTLINE_API_KEYS:?")
    settings = load_settings(env=interpolated(env_dict(gateway)))
    assert settings.api_keys == "test-secret" and settings.http_host == "0.0.0.0"
    assert settings.allowed_hosts == ""  # the Host allow-list: localhost unless set in .env
    assert settings.rate_limit == 0  # unless set in .env


def test_compose_publishes_only_the_gateway_beyond_loopback() -> None:
    """Prometheus (no auth) and Grafana on 127.0.0.1 only, Grafana without anonymous access
    unless asked, Redis pinned to a release, /metrics on the container network explicitly
    (outside a container it binds loopback)."""
    services = BASE["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if name != GATEWAY:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    grafana = interpolated(env_dict(services["grafana"]))
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert re.fullmatch(r"redis:7\.\d+\.\d+", str(services["redis"]["image"]))
    assert load_settings(env={}).metrics_host == "127.0.0.1"
    for name, svc in SPOTLINE.items():
        assert load_settings(env=interpolated(env_dict(svc))).metrics_host == "0.0.0.0", name
    for name, svc in MERGED["services"].items():
        assert env_dict(svc).get("SPOTLINE_METRICS_HOST", "0.0.0.0") == "0.0.0.0", name


def test_secret_files_stay_out_of_git_and_images(tmp_path: Path) -> None:
    """.env (compose's secrets) and deploy/k8s/secrets/ are ignored by git and by the image
    build (`COPY . .` would bake them in); the examples are not."""
    paths = [".env", ".env.local", "deploy/.env", "deploy/k8s/secrets/redis.env",
             ".env.example", "deploy/k8s/secrets/redis.env.example"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert set(out.stdout.split()) == set(paths[:4]), out.stdout + out.stderr
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert {".env", ".env.*", "**/.env", "**/.env.*", "deploy/k8s/secrets"} <= set(lines)
    # docker applies the last matching line: the exception must come after the patterns
    assert lines.index("!.env.example") > max(lines.index(p) for p in (".env.*", "**/.env.*"))


@pytest.mark.parametrize("name", sorted(SPOTLINE))
def test_spotline_service(name: str) -> None:
    svc = SPOTLINE[name]
    env = env_dict(svc)
    assert env["SPOTLINE_REDIS_URL"] == REDIS_URL
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["restart"] == "unless-stopped"
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    # Every SPOTLINE_* variable must be a real setting: an unknown key stops the process.
    load_settings(env=interpolated(env))
    needed = STAGE_MODEL_ENV.get(name)
    assert [k for k in env if k in MODEL_ENV] == ([needed] if needed else [])
    mounts = [str(v) for v in svc.get("volumes", [])]
    if needed:
        assert env[needed].startswith("/models/")
        assert "${SPOTLINE_MODELS:-./models}:/models:ro" in mounts
    else:
        assert not any(":/models" in m for m in mounts)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_services_can_scale(stage: str) -> None:
    """`docker compose up --scale STAGE=N` needs no fixed name and no host port."""
    svc = BASE["services"][stage]
    assert "container_name" not in svc
    assert "ports" not in svc
    assert "scale" not in svc or svc["scale"] >= 1


def test_gpu_override() -> None:
    assert set(GPU["services"]) == set(GPU_STAGES)
    for stage in GPU_STAGES:
        svc = MERGED["services"][stage]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
        assert svc["build"]["target"] == "gpu"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"  # kept from the base file
        env = env_dict(svc)
        assert env["SPOTLINE_DEVICE"] == "cuda"
        assert env[STAGE_MODEL_ENV[stage]] == env_dict(BASE["services"][stage])[
            STAGE_MODEL_ENV[stage]]
        assert env["SPOTLINE_REDIS_URL"] == REDIS_URL
        assert svc["image"] != BASE["services"][stage]["image"], "CUDA and CPU images differ"
        load_settings(env=interpolated(env))


def test_compose_bind_mounts_exist() -> None:
    for name, svc in BASE["services"].items():
        for mount in svc.get("volumes", []):
            source = str(mount).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r'^ENTRYPOINT \["spotline"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    # One target per role (docs/install.md); the compose services name theirs.
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"core", "edge", "full", "gpu"} <= set(targets)
    assert {svc["build"]["target"] for svc in SPOTLINE.values()} == {"core", "full"}
    assert all(svc["build"]["target"] == "core" for name, svc in SPOTLINE.items()
               if name not in STAGE_MODEL_ENV)
    # Every role installs from its lock file, hash-checked; the torch roles in the Makefile's
    # order: build tools, the pinned torch pair, the rest without build isolation, spotline.
    for role, lock in (("core", "core.txt"), ("edge", "edge.txt"), ("full", "full.txt"),
                       ("gpu", "gpu.txt")):
        body = text.split(f" AS {role}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f"-r /opt/requirements/{lock}" in body and "--require-hashes" in body, role
        assert (ROOT / "requirements" / lock).is_file(), lock
        if role in ("full", "gpu"):
            makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
            assert re.search(r"torch==2\.14\.1 torchvision==0\.29\.1", body + makefile)
            positions = [body.find("build.txt"), body.find("torch"),
                         body.find("--no-build-isolation"), body.find("/tmp/wheels/*.whl")]
            assert -1 not in positions and positions == sorted(positions), (role, positions)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git", ".spotline", "out", "models"} <= set(ignored)


# --- (b) Prometheus -------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    out = subprocess.run([promtool(), "check", "config", str(PROMETHEUS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_every_replica() -> None:
    config = load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "5s"
    sd = [c for job in config["scrape_configs"] for c in job.get("dns_sd_configs", [])]
    assert sd, "no dns_sd_configs: scaled replicas would not be found"
    assert {n for c in sd for n in c["names"]} == set(SPOTLINE)
    assert all(c["type"] == "A" and str(c["port"]) == METRICS_PORT for c in sd)
    mount = [v for v in BASE["services"]["prometheus"]["volumes"] if "prometheus.yml" in v]
    assert mount == ["./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


# --- (c) Grafana ----------------------------------------------------------------------------
# Labels Prometheus adds to every series it scrapes (namespace: the PodMonitor's, in Kubernetes).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service"}


def exported_metrics() -> dict[str, set[str]]:
    """Every spotline series name a process exposes (workers, gateway, producers, sinks), with
    the labels it carries (and the target labels Prometheus adds)."""
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "info": ("_info",)}
    for metrics in (Metrics(), SinkMetrics()):
        labels = {getattr(c, "_name", ""): set(getattr(c, "_labelnames", ()))
                  for c in vars(metrics).values()}
        for family in metrics.registry.collect():
            if not family.name.startswith("spotline_"):
                continue  # process_* and python_info: prometheus_client's own
            base = labels.get(family.name, set()) | TARGET_LABELS
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = base | ({"le"} if suffix == "_bucket" else set())
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "datasource":  # its query is a plugin id, not PromQL
            continue
        query = var.get("query")
        out.append((f"variable {var['name']}", query["query"] if isinstance(query, dict)
                    else query))
    return out


SELECTOR = re.compile(r"\b(spotline_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(spotline_\w+)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert sum(p["type"] == "timeseries" for p in graphs) >= 10
    # The Prometheus is a variable (no hard-coded uid), and a namespace filter narrows every
    # query to the pipelines picked (several can share a Prometheus).
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["allValue"] == ".*"
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        assert panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
            for name, matchers in SELECTOR.findall(target["expr"]):
                assert 'namespace=~"$namespace"' in matchers, (panel["title"], name)
    refs = [(p["id"], t["refId"]) for p in graphs for t in p["targets"]]
    assert len(refs) == len(set(refs)), "refIds must be unique within a panel"


def test_dashboard_covers_the_pipeline(dashboard: dict[str, Any]) -> None:
    used = " ".join(expr for _, expr in dashboard_queries(dashboard))
    for name in ("spotline_stage_seconds_bucket", "spotline_end_to_end_seconds_bucket",
                 "spotline_results_published_total", "spotline_entries_total",
                 "spotline_batch_size", "spotline_stream_backlog", "spotline_stream_pending",
                 "spotline_dead_letters_total", "spotline_frames_dropped_total",
                 "spotline_workers_alive", "spotline_entry_bytes", 'phase="queue_wait"',
                 'phase="model"', "histogram_quantile(0.99"):
        assert name in used, f"the dashboard shows nothing of {name}"


def test_dashboard_queries_use_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_metrics()
    problems = []
    for where, expr in dashboard_queries(dashboard):
        found = SELECTOR.findall(expr)
        if not found:
            problems.append(f"{where}: no spotline metric in {expr!r}")
        labels_here: set[str] = set()
        for name, matchers in found:
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by spotline")
                continue
            labels_here |= exported[name]
            for label in MATCHER.findall(matchers or ""):
                if label not in exported[name]:
                    problems.append(f"{where}: {name} has no label {label!r}")
        grouped = {g.strip() for group in GROUPING.findall(expr) for g in group.split(",")}
        grouped |= {label for _, label in LABEL_VALUES.findall(expr)}
        problems += [f"{where}: no metric in it has label {g!r}"
                     for g in sorted(grouped - labels_here - {""}) if labels_here]
    assert not problems, "\n".join(problems)


def test_dashboard_queries_are_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every panel query parses (promtool checks them as recording rules)."""
    grafana_vars = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries(dashboard)):
        if expr.startswith("label_values("):
            continue
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\w+", ".*", expr)
        rules.append({"record": f"spotline:dashboard_query:{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning(dashboard: dict[str, Any]) -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (ds,) = datasources["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "spotline.yml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    grafana = BASE["services"]["grafana"]
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    env = env_dict(grafana)
    # anonymous access off unless GRAFANA_ANONYMOUS=true; then read-only
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- (d) the services' commands, run for real -----------------------------------------------
@pytest.fixture(scope="module")
def service_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data_dir for every service run here, so the tiny models are written once."""
    return tmp_path_factory.mktemp("deploy-data")


def service_env(svc: dict[str, Any], redis_url: str, data_dir: Path) -> dict[str, str]:
    """The service's environment, outside Docker: this Redis, no model paths (they exist only
    in the container: tiny models stand in), small and quick detector settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTLINE_")}
    env.update({k: v for k, v in interpolated(env_dict(svc)).items() if k not in MODEL_ENV})
    env.update(SPOTLINE_REDIS_URL=redis_url, SPOTLINE_DATA_DIR=str(data_dir),
               SPOTLINE_NAMESPACE=f"deploy{uuid.uuid4().hex[:8]}", SPOTLINE_IMGSZ="320",
               SPOTLINE_WARMUP="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode() if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def await_metrics(proc: subprocess.Popen[bytes], url: str, marker: str, log: Path,
                  timeout: float = 240.0) -> str:
    """Poll /metrics until it shows ``marker``; fail at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = fetch(url)
        if body is not None and marker in body:
            return body
        try:
            proc.wait(timeout=0.25)  # the pause between polls, and an early-exit check
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"exited with {proc.returncode} before serving {url}:\n"
                    f"{log.read_text(errors='replace')[-4000:]}")
    pytest.fail(f"{url} did not show {marker!r} within {timeout:.0f}s:\n"
                f"{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def run_service(redis_server: EmbeddedRedis, service_data_dir: Path,
                tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        svc = SPOTLINE[name]
        metrics_port, http_port = str(free_port()), str(free_port())
        ports = {METRICS_PORT: metrics_port, HTTP_PORT: http_port}
        command = [ports.get(str(arg), str(arg)) for arg in svc["command"]]
        assert metrics_port in command, f"{name}: no --metrics-port {METRICS_PORT}"
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "spotline", *command],
                                    env=service_env(svc, redis_server.url, service_data_dir),
                                    cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, f"http://127.0.0.1:{metrics_port}/metrics", log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_cleanly(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as `docker compose stop` sends it: the process must exit 0 in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after SIGTERM:\n{log.read_text(errors='replace')[-4000:]}")
    assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text(errors='replace')[-4000:]}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_service_command_runs(stage: str, run_service: Any) -> None:
    module = STAGE_CLASSES[stage].partition(":")[0]
    assert importlib.util.find_spec(module) is not None, f"no module {module} for {stage}"
    proc, url, log = run_service(stage)
    # The gauge is set once the stage's models are loaded: the worker is really up.
    body = await_metrics(proc, url, "spotline_model_loaded{", log)
    assert f'stage="{stage}"' in body
    stop_cleanly(proc, log)


def test_gateway_service_command_runs(run_service: Any) -> None:
    proc, url, log = run_service(GATEWAY)
    await_metrics(proc, url, "spotline_", log)
    stop_cleanly(proc, log)
