"""Bulk ingestion as RQ jobs on real Redis: a job to completion with its progress, a bad input
in the FailedJobRegistry with its reason, a Redis outage turned into a scheduled retry."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cv2
import numpy as np
from rq.job import JobStatus

from spotline.common.embedded import EmbeddedRedis, free_port
from spotline.common.settings import Settings, settings_env
from spotline.common.transport import Transport
from spotline.producer.jobs import (
    RETRY_INTERVALS,
    enqueue_ingest,
    ingest_job,
    ingest_queue,
    list_jobs,
    run_jobs_worker,
)

CAPS = ["grey missile", "yellow helicopter"]


def write_folder(path: Path, n: int) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        ok, buf = cv2.imencode(".jpg", np.full((24, 32 + i, 3), 40 * i, np.uint8))
        assert ok
        (path / f"f{i}.jpg").write_bytes(buf.tobytes())
    return path


def queue_name() -> str:
    return f"ingest-{uuid.uuid4().hex[:8]}"


def test_ingest_job_runs_to_completion_with_progress(tmp_path: Path, redis_server: EmbeddedRedis,
                                                     settings: Settings,
                                                     transport: Transport) -> None:
    folder = write_folder(tmp_path / "footage", 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    q = queue_name()
    [job] = enqueue_ingest([str(folder)], CAPS, settings, redis_server.url, queue_name=q)
    assert job.get_status() == JobStatus.QUEUED
    assert run_jobs_worker(redis_server.url, q, burst=True, fork=False)
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED
    assert {k: job.meta[k] for k in ("published", "total", "dropped", "rejected", "read")} == {
        "published": 3, "total": 4, "dropped": 0, "rejected": 1, "read": 4}
    result = job.latest_result().return_value
    assert result["published"] == 3 and result["rejected_frames"][0][0] == "broken.jpg"
    assert transport.r.xlen(transport.keys.inbox("detect")) == 3  # in the job's namespace
    [row] = list_jobs(redis_server.url, q)
    assert (row.id, row.status, row.error) == (job.id, "finished", None)
    assert row.progress == "3/4 published, 0 dropped, 1 rejected"


def test_bad_input_fails_with_its_reason(tmp_path: Path, redis_server: EmbeddedRedis,
                                         settings: Settings) -> None:
    q = queue_name()
    missing = tmp_path / "no-such-video.mp4"
    [job] = enqueue_ingest([str(missing)], CAPS, settings, redis_server.url, queue_name=q)
    run_jobs_worker(redis_server.url, q, burst=True, fork=False)
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert job.number_of_retries is None  # a bad input is not retried
    queue = ingest_queue(redis_server.url, q)
    assert queue.failed_job_registry.get_job_ids() == [job.id]
    exc = job.latest_result().exc_string
    assert f"InputError: cannot ingest {missing}: no such file or folder" in exc
    [row] = list_jobs(redis_server.url, q)
    assert row.status == "failed"
    assert row.error == (f"spotline.common.errors.InputError: cannot ingest {missing}: "
                         f"no such file or folder: {missing}")


def test_redis_outage_schedules_a_retry(tmp_path: Path, redis_server: EmbeddedRedis,
                                        settings: Settings) -> None:
    folder = write_folder(tmp_path / "footage", 2)
    q = queue_name()
    dead = f"redis://127.0.0.1:{free_port()}/0"  # the pipeline's Redis is down
    env = settings_env(settings.replace(reconnect_max_s=0.2))
    queue = ingest_queue(redis_server.url, q)
    job = queue.enqueue(ingest_job, str(folder), CAPS, env, None, meta={"spec": str(folder)})
    # the worker publishes to the Redis of its own settings, not one a job names
    run_jobs_worker(redis_server.url, q, burst=True, fork=False,
                    settings=settings.replace(redis_url=dead))
    job.refresh()
    assert job.get_status() == JobStatus.SCHEDULED
    assert job.number_of_retries == 1
    assert "redis unreachable" in job.meta["last_error"]
    assert job.meta["done"] == 0  # nothing was published: the retry starts from the top
    assert queue.scheduled_job_registry.get_job_ids() == [job.id]
    assert RETRY_INTERVALS == [1, 5, 15]
    [row] = list_jobs(redis_server.url, q)
    assert row.status == "scheduled"
    json.dumps(job.meta)  # meta stays JSON (no pickle)


def test_ingest_and_jobs_commands(tmp_path: Path, redis_server: EmbeddedRedis,
                                  settings: Settings, transport: Transport) -> None:
    from click.testing import CliRunner

    from spotline.cli import cli
    folder = write_folder(tmp_path / "footage", 2)
    q = queue_name()
    env = {**settings_env(settings), "SPOTLINE_REDIS_URL": redis_server.url}
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("ingest", str(folder), str(tmp_path / "missing"), "-c", "grey missile",
              "--queue", q)
    ids = [line.split()[0] for line in out.splitlines() if line.endswith(("footage", "missing"))]
    assert len(ids) == 2
    assert f"queued 2 job(s) on {q!r}" in out
    run("jobs", "worker", "--burst", "--no-fork", "--queue", q)
    listing = run("jobs", "list", "--queue", q)
    assert f"{ids[0]}  finished  {folder}  2/2 published, 0 dropped, 0 rejected" in listing
    assert f"{ids[1]}  failed" in listing and "no such file or folder" in listing
    assert transport.r.xlen(transport.keys.inbox("detect")) == 2
