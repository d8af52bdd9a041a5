"""Every query of the Grafana dashboard, run against a REAL Prometheus (Debian's `prometheus`
package, which `make tools` installs) scraping a running pipeline: its workers (`spotline up
--metrics`), a gateway that answered /identify, a Python client, a publisher that dropped a
frame, a webhook sink that retried and dead-lettered, a registered feed, and a poison entry
that was dead-lettered; and a second pipeline, in track mode, in another namespace (the
dashboard's namespace variable picks both, as a multi-select does). Each query must parse and
run, and each one must find its series, except caption flips (the tiny models' tracks may never
swap a caption) and reclaimed entries (no consumer died), named below.

Without the prometheus binary the test fails: a skip would hide that the dashboard was never
checked against Prometheus itself."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.metrics import Metrics, PipelineExporter
from spotline.common.settings import Settings
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
from spotline.producer.client import Client
from spotline.producer.control import FeedSpec, Registry
from spotline.producer.gateway import create_app
from spotline.producer.publisher import publish_source
from spotline.producer.sinks import Sink, SinkMetrics, SinkOptions, WebhookTarget
from spotline.producer.sources import open_source
from tests.conftest import FAST
from tests.faultlib import small_frame, wait_for
from tests.test_metrics import free_port_block

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "spotline.json"
NAMESPACE = "spotline-test"  # the target label the namespace variable filters on
TRACK_NAMESPACE = "spotline-track"  # the track-mode pipeline's
# Series these pipelines cannot be relied on to have: a caption moving to another track (the
# tiny models' boxes are arbitrary), an entry reclaimed from a dead consumer (none dies).
MAY_BE_EMPTY = {("Caption flips / min", "A"), ("Reclaimed entries and Redis outages", "A")}
GRAFANA = {"$__rate_interval": "20s", "$__range": "10m", "$__interval": "1s"}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus not found: `make tools` installs it (Debian's prometheus "
                    "package)")
    return path


def substitute(expr: str) -> str:
    """Grafana's variables as the dashboard's defaults give them: this namespace, all stages,
    phases and sources."""
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    picked = f"{NAMESPACE}|{TRACK_NAMESPACE}"  # two namespaces picked, as Grafana joins them
    return re.sub(r"\$(\w+)", lambda m: picked if m.group(1) == "namespace" else ".*", expr)


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every panel target, and of every query variable as
    (variable, name, the series it reads)."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [(p["title"], t["refId"], substitute(t["expr"])) for p in dashboard["panels"]
           for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            series = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert series, var["name"]
            out.append(("variable", var["name"], substitute(series.group(1))))
    return out


class Hook:
    """A webhook receiver: the first delivery of each result fails (500, the sink retries),
    results from the source "refused" always fail (the sink dead-letters them)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.accepted: set[str] = set()
        self.lock = threading.Lock()

    def answer(self, doc: dict[str, Any]) -> int:
        with self.lock:
            first = doc["frame_id"] not in self.seen
            self.seen.add(doc["frame_id"])
            if first or doc["source_id"] == "refused":
                return 500
            self.accepted.add(doc["frame_id"])
            return 200


@pytest.fixture
def hook() -> Iterator[tuple[Hook, str]]:
    rec = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(rec.answer(json.loads(body)))
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield rec, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def track_mode(settings: Settings, url: str) -> list[int]:
    """A track-mode pipeline of its own (detect, track, collect in this process, in burst mode)
    over six frames of one source and an unnumbered one; returns the /metrics ports of its
    track worker and of its pipeline-wide exporter."""
    from spotline.common.collector import Collector
    from spotline.common.worker import Worker
    from spotline.stages import libs
    from spotline.stages.collect import Collect
    from spotline.stages.detect import Detect
    from spotline.stages.track import Track

    s = settings.replace(namespace=settings.namespace + "tr", tracking=True, imgsz=256,
                         max_det=4, upscale=False, track_keyframe_every=4)
    t = Transport(s, url=url)
    client = Client(t)
    image = (libs.ultralytics_assets() / "bus.jpg").read_bytes()
    ids = [client.publish(image, ["bus", "man"], source_id="cam") for _ in range(6)]
    ids.append(client.publish(image, ["bus", "man"], source_id="cam", sequenced=False))
    Worker(Detect(s), s, t, burst=True).run()
    track_metrics, exporter_metrics = Metrics(), Metrics()
    Worker(Track(s), s, t, burst=True, metrics=track_metrics).run()
    Collector(Collect(s), s, t, burst=True).run()
    assert set(client.await_results(ids, timeout=60)) == set(ids)
    assert PipelineExporter(t, exporter_metrics).refresh()
    return [track_metrics.serve(0), exporter_metrics.serve(0)]


def start_prometheus(targets: list[int], track_targets: list[int],
                     tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": "spotline", "static_configs": [
                  {"targets": [f"127.0.0.1:{p}" for p in targets],
                   "labels": {"namespace": NAMESPACE}},
                  {"targets": [f"127.0.0.1:{p}" for p in track_targets],
                   "labels": {"namespace": TRACK_NAMESPACE}}]}]}
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={path}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(ready, 30, "prometheus ready", every=0.2)
    return proc, url


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def test_every_dashboard_query_finds_its_series_in_a_real_prometheus(
        redis_server: EmbeddedRedis, settings: Settings, hook: tuple[Hook, str],
        tmp_path: Path) -> None:
    rec, hook_url = hook
    stages = pipeline_stages(settings)
    s = settings.replace(redis_url=redis_server.url, metrics_port=free_port_block(len(stages)),
                         tta=False, **FAST)
    pipeline = LocalPipeline(s, metrics=True)
    procs: list[subprocess.Popen[bytes]] = []
    with pipeline as url:
        assert pipeline.supervisor is not None
        ports = [c.metrics_port for c in pipeline.supervisor.children]
        # a Python client, a gateway, a publisher and a webhook sink, each on its /metrics
        client = Client.connect(url, s)
        gw_metrics, sink_metrics = Metrics(), SinkMetrics()
        ports += [client.metrics.serve(0), gw_metrics.serve(0), sink_metrics.serve(0)]
        prom, prom_url = start_prometheus([p for p in ports if p], track_mode(s, url),
                                          tmp_path)
        procs.append(prom)
        sink = Sink(client.t, WebhookTarget(hook_url, timeout_s=5),
                    SinkOptions(name="hook", start="all", backoff_s=0.01, max_attempts=2),
                    sink_metrics)
        sink_thread = threading.Thread(target=sink.run, daemon=True)
        sink_thread.start()
        try:
            ids = [client.publish(small_frame(i), ["red car"], source_id="cam1")
                   for i in range(3)]
            ids.append(client.publish(small_frame(9), ["red car"], source_id="refused"))
            with TestClient(create_app(s, Client.connect(url, s), gw_metrics, timeout_s=120),
                            base_url="http://127.0.0.1") as http:
                r = http.post("/identify", json={"instances": [
                    {"key": 0, "caption": "red car",
                     "b64": base64.b64encode(small_frame(5)).decode()}]})
                assert r.status_code == 200, r.text
            folder = tmp_path / "frames"
            folder.mkdir()
            (folder / "a.jpg").write_bytes(small_frame(7))
            (folder / "b.jpg").write_bytes(b"not an image")  # rejected: a dropped frame
            stats = publish_source(open_source(str(folder), ["red car"], source_id="folder"),
                                   client, s, progress=False, policy="block")
            ids += stats.frame_ids
            client.t.add(client.keys.inbox("detect"), "poison", b"\x00 not msgpack")
            Registry(client.t).add(FeedSpec(source_id="cam9", spec=str(folder / "a.jpg"),
                                            captions=("red car",)))
            client.await_results(ids, timeout=120)
            wait_for(lambda: len(rec.accepted) >= 5 and sink.counts.failed >= 1, 60,
                     "the sink's deliveries")
            # Every query finds its series once Prometheus has scraped twice after the work.
            checked = queries()
            missing: list[str] = []

            def all_found() -> bool:
                missing[:] = [f"{title} {ref}: {expr}" for title, ref, expr in checked
                              if (title, ref) not in MAY_BE_EMPTY and not query(prom_url,
                                                                                expr)]
                return not missing
            with contextlib.suppress(AssertionError):  # the assert below names what is missing
                wait_for(all_found, 40, "every query's series", every=1.0)
            assert not missing, "no series for:\n" + "\n".join(missing)
            # the namespace filter filters: another namespace finds nothing
            assert query(prom_url, 'spotline_build_info{namespace="elsewhere"}') == []
            # the pipeline-wide gauges come from one target per pipeline only
            for ns in (NAMESPACE, TRACK_NAMESPACE):
                (exporter,) = query(prom_url, f'spotline_pipeline_exporter{{namespace="{ns}"}}'
                                              " == 1")
                assert {r["metric"]["instance"] for r in query(
                    prom_url, f'spotline_workers_alive{{namespace="{ns}"}}')} == {
                    exporter["metric"]["instance"]}
            # one tracks-alive series per source, from the exporter
            assert [r["metric"]["source"] for r in query(prom_url, "spotline_tracks_alive")] \
                == ["cam"]
            # frames by where they entered
            vias = {r["metric"]["via"] for r in query(
                prom_url, f'spotline_frames_published_total{{namespace="{NAMESPACE}"}}')}
            assert vias == {"client", "gateway"}
        finally:
            sink.stop()
            sink_thread.join(timeout=30)
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
