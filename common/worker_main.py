"""`spotline worker STAGE`: connect, serve metrics, pick the loop for the stage, run until
stopped. The one place that tells the collector from the other stages (topology.is_last)."""

from __future__ import annotations

import logging

from .collector import Collector
from .errors import TransportError
from .metrics import Metrics, Poller, gauge_refresher
from .settings import Settings
from .stage import Stage
from .topology import is_last
from .transport import Transport
from .worker import Counts, Worker

log = logging.getLogger(__name__)


def loop_for(stage: Stage) -> type[Worker]:
    """The loop that runs ``stage``: the collector's join for the last stage, else forwarding."""
    return Collector if is_last(stage.name) else Worker


def run_stage(stage: Stage, settings: Settings, url: str, burst: bool = False,
              metrics_port: int | None = None) -> Counts:
    """Entry point of `spotline worker STAGE`: connect, serve metrics, run until stopped."""
    metrics = Metrics()
    transport = Transport(settings, url=url)
    poller = refresh = None
    if metrics_port is not None:
        metrics.serve(metrics_port, addr=settings.metrics_host)
        # Gauges read Redis on their own connection, never the worker's; the pipeline-wide ones
        # only in the worker that holds the exporter lease (common/metrics.py).
        refresh = gauge_refresher(Transport(settings, url=url), metrics, transport)
        poller = Poller(5.0, refresh).start()
    worker = loop_for(stage)(stage, settings, transport, burst=burst, metrics=metrics)
    worker.install_signals()
    try:
        return worker.run()
    except TransportError:
        log.exception("stage=%s giving up: redis unreachable", stage.name)
        raise
    finally:
        if poller:
            poller.stop()
            refresh.exporter.release()  # type: ignore[union-attr]
