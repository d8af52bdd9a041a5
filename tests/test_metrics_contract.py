"""What operators rely on in the metrics (docs/metrics.md), against a real Redis:

- frames are counted where every way in converges (Client.publish), by source and way in;
- caller-chosen source labels are capped;
- the pipeline-wide gauges come from exactly one process (a lease in Redis), and move to
  another when it stops or loses the lease;
- tracks alive is one value per source however many track workers note it, the newest frame
  winning;
- every registry has the process series and spotline_build_info, and no _created series."""

from __future__ import annotations

import platform

from prometheus_client import generate_latest

from spotline.common.embedded import EmbeddedRedis
from spotline.common.metrics import (
    MAX_SOURCES,
    OTHER,
    Metrics,
    PipelineExporter,
    TracksAlive,
    spotline_version,
)
from spotline.common.settings import Settings
from spotline.common.transport import Transport
from spotline.producer.client import Client
from spotline.producer.control import FeedSpec, Registry
from spotline.producer.gateway import create_app
from spotline.producer.sinks import SinkMetrics
from tests.faultlib import small_frame, wait_for


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exported_labels(metrics: Metrics, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {tuple(sorted(s.labels.items())) for f in metrics.registry.collect()
            for s in f.samples if s.name == name}


def test_frames_are_counted_where_they_enter(redis_server: EmbeddedRedis,
                                             settings: Settings) -> None:
    client = Client.connect(redis_server.url, settings)
    client.publish(small_frame(1), ["red car"], source_id="cam1")
    client.publish(small_frame(2), ["red car"], source_id="cam1")
    assert value(client.metrics, "spotline_frames_published_total", source="cam1",
                 via="client") == 2
    # the gateway counts through its client, on the registry its /metrics serves
    gateway_metrics = Metrics()
    create_app(settings, client, gateway_metrics)
    assert client.metrics is gateway_metrics and client.via == "gateway"
    client.publish(small_frame(3), ["red car"], source_id="key-a")
    assert value(gateway_metrics, "spotline_frames_published_total", source="key-a",
                 via="gateway") == 1
    client.close()


def test_source_labels_are_capped() -> None:
    m = Metrics()
    for i in range(MAX_SOURCES + 10):
        m.count_published(f"src{i}", "client")
    sources = {dict(labels)["source"] for labels in
               exported_labels(m, "spotline_frames_published_total")}
    assert len(sources) == MAX_SOURCES + 1 and OTHER in sources
    assert value(m, "spotline_frames_published_total", source=OTHER, via="client") == 10
    assert m.source("src0") == "src0"  # a source seen before keeps its label


def test_one_process_exports_the_pipeline_gauges(redis_server: EmbeddedRedis,
                                                 settings: Settings) -> None:
    t1 = Transport(settings, url=redis_server.url)
    t2 = Transport(settings, url=redis_server.url)
    m1, m2 = Metrics(), Metrics()
    a, b = PipelineExporter(t1, m1, ttl_s=30), PipelineExporter(t2, m2, ttl_s=30)
    assert a.refresh() is True and b.refresh() is False
    assert value(m1, "spotline_pipeline_exporter") == 1
    assert value(m2, "spotline_pipeline_exporter") == 0
    assert value(m1, "spotline_workers_alive", stage="detect") == 0
    assert value(m1, "spotline_stream_backlog", stream="results") == 0
    assert value(m2, "spotline_workers_alive", stage="detect") is None
    assert not exported_labels(m2, "spotline_stream_backlog")
    # the holder stops: the other takes over at its next refresh, not after the lease's ttl
    a.release()
    assert not exported_labels(m1, "spotline_stream_backlog")
    assert b.refresh() is True and a.refresh() is False
    assert value(m2, "spotline_workers_alive", stage="detect") == 0
    assert value(m1, "spotline_pipeline_exporter") == 0
    t1.close()
    t2.close()


def test_an_exporter_that_lost_its_lease_clears_its_gauges(redis_server: EmbeddedRedis,
                                                           settings: Settings) -> None:
    """A holder that stopped refreshing (stuck, partitioned) loses the lease when it expires;
    at its next refresh it finds another holder and clears what it exported."""
    t1 = Transport(settings, url=redis_server.url)
    t2 = Transport(settings, url=redis_server.url)
    m1, m2 = Metrics(), Metrics()
    a, b = PipelineExporter(t1, m1, ttl_s=0.3), PipelineExporter(t2, m2, ttl_s=0.3)
    assert a.refresh()
    wait_for(b.refresh, 10, "the lease to expire and move")
    assert a.refresh() is False
    assert not exported_labels(m1, "spotline_workers_alive")
    assert exported_labels(m2, "spotline_workers_alive")
    t1.close()
    t2.close()


def test_tracks_alive_is_one_value_per_source(redis_server: EmbeddedRedis,
                                              settings: Settings) -> None:
    """Two track workers tracking frames of the same sources: each notes what it saved; the
    newest frame of a source wins, and the exporter shows one series per source."""
    t = Transport(settings, url=redis_server.url)
    worker_a, worker_b = TracksAlive(t), TracksAlive(Transport(settings, url=redis_server.url))
    worker_a.note("cam1", 1, 3)
    worker_b.note("cam1", 2, 4)
    worker_a.note("cam1", 1, 3)  # a late note of an older frame changes nothing
    worker_b.note("cam2", 7, 1)
    assert worker_a.read() == {"cam1": 4, "cam2": 1}
    m = Metrics()
    assert PipelineExporter(t, m).refresh()
    assert value(m, "spotline_tracks_alive", source="cam1") == 4
    assert value(m, "spotline_tracks_alive", source="cam2") == 1
    assert len(exported_labels(m, "spotline_tracks_alive")) == 2
    t.close()


def test_the_end_to_end_objective_comes_from_the_settings(redis_server: EmbeddedRedis,
                                                          settings: Settings) -> None:
    """SpotlineEndToEndSlow compares p95 with slo_end_to_end_s, as the exporter publishes it."""
    t = Transport(settings.replace(slo_end_to_end_s=12.5), url=redis_server.url)
    m = Metrics()
    exporter = PipelineExporter(t, m)
    assert exporter.refresh()
    assert value(m, "spotline_end_to_end_objective_seconds", quantile="0.95") == 12.5
    exporter.release()
    assert value(m, "spotline_end_to_end_objective_seconds", quantile="0.95") is None
    t.close()


def test_feeds_are_exported_by_state(redis_server: EmbeddedRedis, settings: Settings) -> None:
    t = Transport(settings, url=redis_server.url)
    Registry(t).add(FeedSpec(source_id="cam9", spec="rtsp://camera.invalid/stream"))
    m = Metrics()
    assert PipelineExporter(t, m).refresh()
    assert value(m, "spotline_feeds", state="pending") == 1  # no supervisor runs it
    t.close()


def test_every_registry_has_process_series_and_build_info() -> None:
    for registry in (Metrics().registry, SinkMetrics().registry):
        text = generate_latest(registry).decode()
        assert f'spotline_build_info{{python="{platform.python_version()}",version="' \
               f'{spotline_version()}"}} 1.0' in text
        assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
        assert "python_info" in text
        assert "_created" not in text  # disable_created_metrics(): half the series, no use
    assert spotline_version() != "unknown"
