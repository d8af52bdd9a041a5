"""`spotline sink webhook|mqtt URL`: push every result to another system (producer/sinks.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

F = Callable[..., Any]


def _common(fn: F) -> F:
    """The options both sinks share."""
    options = [
        click.option("--name", default=None, help="Consumer group suffix (group sink-NAME); "
                     "sinks with different names each get every result [default: the kind]."),
        click.option("--start", type=click.Choice(["new", "all"]), default="new",
                     show_default=True, help="Where a NEW group starts: results published from "
                     "now on, or all the results stream still holds. An existing group resumes "
                     "where it stopped."),
        click.option("--max-attempts", type=click.IntRange(1), default=5, show_default=True,
                     help="Attempts per result before it goes to the dead-letter stream."),
        click.option("--backoff", type=click.FloatRange(0), default=0.5, show_default=True,
                     help="First retry delay in seconds; doubles each retry (max 30 s)."),
        click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
                     help="Seconds to wait for the receiver per attempt."),
        click.option("--consumer", default="", help="Consumer name in the group [default: "
                     "NAME-hostname, stable, so a restarted sink re-sends what it had read]."),
        click.option("--metrics-port", type=int, default=None,
                     help="Serve /metrics (delivered, retried, failed, lag) on this port."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def sink() -> None:
    """Deliver every result to a webhook or an MQTT broker, as a consumer group on the results
    stream: a sink that is stopped or killed loses nothing and resumes where it stopped."""


@sink.command("webhook")
@click.argument("url")
@click.option("--secret-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File of Standard Webhooks secrets (whsec_<base64>, one a line): each POST "
              "carries webhook-id, webhook-timestamp and webhook-signature (v1,<base64 "
              "HMAC-SHA256>, one per secret). Re-read when it changes: put the new secret "
              "beside the old, then remove the old (docs/results.md).")
@_common
@click.pass_obj
def webhook(ctx: Any, url: str, secret_file: str | None, **opts: Any) -> None:
    """POST each result as JSON to URL (retries with backoff; 2xx means delivered)."""
    from spotline.producer.sinks import SecretFile, WebhookTarget

    secret = SecretFile(Path(secret_file)) if secret_file else None
    _run(ctx, "webhook", lambda: WebhookTarget(url, secret, opts["timeout"]), opts)


@sink.command("mqtt")
@click.argument("url")
@click.option("--topic", default="spotline/{source_id}/results", show_default=True,
              help="Topic template; {source_id} is replaced by the result's source.")
@click.option("--client-id", default="", help="MQTT client id [default: spotline-sink-host].")
@_common
@click.pass_obj
def mqtt(ctx: Any, url: str, topic: str, client_id: str, **opts: Any) -> None:
    """Publish each result as JSON to an MQTT broker at QoS 1 (URL mqtt://[user:pass@]host[:port])."""
    from spotline.producer.sinks import MqttTarget

    _run(ctx, "mqtt", lambda: MqttTarget(url, topic, client_id, opts["timeout"]), opts)


def _run(ctx: Any, kind: str, make_target: Callable[[], Any], opts: dict[str, Any]) -> None:
    from spotline.common.transport import Transport
    from spotline.pipeline.supervisor import running_url
    from spotline.producer.sinks import Sink, SinkMetrics, SinkOptions

    settings = ctx.settings
    url = running_url(settings)
    if not url:
        raise click.ClickException(
            "no Redis to talk to: set SPOTLINE_REDIS_URL, or start `spotline up` first")
    options = SinkOptions(name=opts["name"] or kind, consumer=opts["consumer"],
                          start=opts["start"], max_attempts=opts["max_attempts"],
                          backoff_s=opts["backoff"])
    metrics = SinkMetrics()
    if opts["metrics_port"] is not None:
        metrics.serve(opts["metrics_port"], addr=settings.metrics_host)
    runner = Sink(Transport(settings, url=url), make_target(), options, metrics)
    runner.install_signals()
    counts = runner.run()
    click.echo(f"sink {options.group}: {counts.delivered} delivered, {counts.retried} retried, "
               f"{counts.failed} dead-lettered", err=True)
