"""Every worker process serves /metrics; during an end-to-end run the documented series exist
and move (counts equal the frames sent, histograms non-empty)."""

from __future__ import annotations

import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings
from spotline.pipeline.demo import DEMO_FRAMES, demo_images
from spotline.pipeline.supervisor import LocalPipeline, pipeline_stages
from spotline.producer.client import Client
from tests.conftest import FAST
from tests.faultlib import wait_for


def free_port_block(n: int) -> int:
    """A base port with ``n`` free consecutive ports after it."""
    for base in range(23000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape_refreshed(port: int, stage: str, timeout: float = 15.0) -> dict[
        tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape once the worker's gauges have been refreshed since it was ready (its poller runs
    every 5 s; a quick run can end before the first refresh): the exporter gauge is set at
    every refresh, 1 in the one worker that exports the pipeline-wide gauges."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ("spotline_pipeline_exporter", ()) in samples and (
                samples[("spotline_pipeline_exporter", ())] == 0 or
                total(samples, "spotline_workers_alive", stage=stage) >= 1) or \
                time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all((k, v2) in lab for k, v2 in labels.items()))


def test_each_worker_serves_metrics_that_move(redis_server: EmbeddedRedis,
                                              settings: Settings) -> None:
    stages = pipeline_stages(settings)
    base = free_port_block(len(stages))
    s = settings.replace(redis_url=redis_server.url, metrics_port=base, **FAST)
    images = demo_images()
    frames = [(img, DEMO_FRAMES[name]) for name, img in images.items()] * 3
    pipeline = LocalPipeline(s, metrics=True)
    with pipeline as url:
        client = Client.connect(url, s)
        ids = [client.publish(img, caps, source_id="cam1") for img, caps in frames]
        client.await_results(ids, timeout=300)
        assert pipeline.supervisor is not None
        ports = {c.stage: c.metrics_port for c in pipeline.supervisor.children}
        scraped = {stage: scrape_refreshed(port, stage) for stage, port in ports.items()}
        # The exporter's gauges refresh every 5 s: the refresh scraped above may predate a
        # worker's first read, so await one that counts every stage's worker.
        for stage, port in ports.items():
            if total(scraped[stage], "spotline_pipeline_exporter") == 1:
                wait_for(lambda p=port: all(total(scrape(p), "spotline_workers_alive",
                                                  stage=st) >= 1 for st in stages),
                         15, "the exporter counting every stage's worker", every=0.2)
                scraped[stage] = scrape(port)
    n = len(frames)
    for stage in stages:
        m = scraped[stage]
        assert total(m, "spotline_model_loaded", stage=stage) == 1
        assert total(m, "spotline_stage_seconds_count", stage=stage, phase="queue_wait") > 0
        assert total(m, "spotline_stage_seconds_count", stage=stage, phase="redis") > 0 or \
            stage == "collect"
    # The pipeline-wide gauges come from exactly one worker (the exporter lease's holder).
    exporters = [st for st, m in scraped.items() if total(m, "spotline_pipeline_exporter") == 1]
    assert len(exporters) == 1, exporters
    for stage, m in scraped.items():
        if stage != exporters[0]:
            assert total(m, "spotline_workers_alive") == 0
            assert not any(n == "spotline_stream_backlog" for n, _ in m)
    m = scraped[exporters[0]]
    for stage in stages:
        assert total(m, "spotline_workers_alive", stage=stage) >= 1
        assert ("spotline_stream_backlog", (("stream", stage),)) in m
        assert ("spotline_stream_pending", (("stream", stage),)) in m
    detect = scraped["detect"]
    assert total(detect, "spotline_entries_total", stage="detect", outcome="ok") == n
    assert total(detect, "spotline_batch_size_count", stage="detect") >= 1
    assert total(detect, "spotline_batch_size_sum", stage="detect") == n
    assert total(detect, "spotline_stage_seconds_count", stage="detect", phase="model") >= 1
    assert total(detect, "spotline_entry_bytes_count") > 0
    assert total(detect, "spotline_crops_per_frame_count") == n
    collect = scraped["collect"]
    assert total(collect, "spotline_results_published_total") == n
    assert total(collect, "spotline_end_to_end_seconds_count", source="cam1") == n
    assert total(collect, "spotline_end_to_end_seconds_sum", source="cam1") > 0
    assert total(collect, "spotline_dead_letters_total") == 0

