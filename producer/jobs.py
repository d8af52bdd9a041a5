"""Bulk ingestion as RQ jobs: recorded videos, image folders and TIL datasets.

    jobs = enqueue_ingest(["flight.mp4", "frames/"], ["grey missile"], settings, url)
    run_jobs_worker(url, burst=True)          # or `spotline jobs worker`
    for row in list_jobs(url): print(row)     # or `spotline jobs list`

One job per path. A job opens its source and publishes every frame with ``block`` backpressure
(recorded footage: nothing is dropped), and records its progress in ``job.meta``
(``published``, ``total``, ``dropped``, ``rejected``, ``read``). A transient failure (Redis
unreachable: ``TransportError``) makes the job ask RQ for a retry (``Retry(max=3,
interval=[1, 5, 15])`` seconds) and the retry resumes after the frames already done; a bad input
(missing path, unreadable video, bad dataset line) raises ``InputError`` at once, so the job
lands in RQ's ``FailedJobRegistry`` with that reason and is not retried.

Jobs live on the pipeline's Redis; their arguments and results are JSON (RQ's JSONSerializer),
never pickle. Two rules keep that Redis from being a way in (docs/security.md#jobs):

- the worker runs only the functions in ``JOB_FUNCTIONS`` (``SpotlineJob``): a job naming any
  other (``os.system``...), an instance method or a callback fails with ``JobRefused`` before
  anything is imported or called;
- a job's arguments carry no secrets: only the settings ``job_settings_env`` keeps (no URL, key,
  password, token...). The worker publishes to its own Redis with its own secrets.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry, SimpleWorker, Worker, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer

from ..common.errors import InputError, TransportError
from ..common.redact import redact, redact_url
from ..common.settings import ENV_PREFIX, Settings, load_settings, settings_env
from ..common.transport import connect
from .client import Client
from .publisher import BLOCK, PublishStats, publish_source
from .sources import open_source

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "spotline-ingest"
RETRY_MAX = 3
RETRY_INTERVALS = [1, 5, 15]  # seconds before retry 1, 2, 3
JOB_TIMEOUT_S = 24 * 3600  # a long recording at a slow pipeline's pace
RESULT_TTL_S = 7 * 24 * 3600
META_EVERY_S = 0.5  # how often a running job saves its progress


# A setting is secret when its name says so, or when its value holds URL credentials: those never
# go into a job (kept 7 days in Redis, readable by whoever reads the queue).
_SECRET_WORDS = frozenset({"url", "urls", "key", "keys", "password", "passwd", "secret",
                           "secrets", "token", "tokens", "credential", "credentials", "auth"})
_URL_USERINFO = re.compile(r"://[^/\s]*@")


def _is_secret(name: str, value: str) -> bool:
    return (not _SECRET_WORDS.isdisjoint(name.lower().split("_"))
            or bool(_URL_USERINFO.search(value)))


def job_settings_env(settings: Settings) -> dict[str, str]:
    """The SPOTLINE_* variables a job may carry: ``settings_env`` without any secret-bearing
    one (the Redis URL, API keys, any URL with credentials)."""
    return {k: v for k, v in settings_env(settings).items() if not _is_secret(k, v)}


def _secret_env(settings: Settings) -> dict[str, str]:
    return {k: v for k, v in settings_env(settings).items() if _is_secret(k, v)}


class JobRefused(Exception):
    """A job that names something other than a spotline job function."""


class SpotlineJob(Job):
    """An RQ job that can run only a function of ``JOB_FUNCTIONS``.

    RQ imports and calls whatever dotted name a job holds (``os.system`` included), and its
    callbacks likewise; whoever can write to the queue's Redis could run code as the worker.
    This class resolves the name against the allow-list instead of importing it, and runs no
    callbacks: a refused job fails (FailedJobRegistry) with ``JobRefused`` and the reason."""

    @property
    def func(self):  # type: ignore[override]
        name = self.func_name
        callbacks = [n for n in (self._success_callback_name, self._failure_callback_name,
                                 self._stopped_callback_name) if n]
        function = JOB_FUNCTIONS.get(name or "")
        if function is None or self.instance is not None or callbacks:
            what = f"callbacks {callbacks}" if callbacks and function else f"function {name!r}"
            raise JobRefused(f"refused to run {what}: spotline's jobs worker runs only "
                             f"{sorted(JOB_FUNCTIONS)}")
        return function

    @property
    def success_callback(self):  # type: ignore[override]
        return None

    @property
    def failure_callback(self):  # type: ignore[override]
        return None

    @property
    def stopped_callback(self):  # type: ignore[override]
        return None


# What the jobs worker learnt from its own process (run_jobs_worker): the Redis to publish to
# and the secret settings. A forked work horse inherits them.
_WORKER: dict[str, Any] = {"url": None, "secrets": {}}


def rq_connection(url: str) -> redis.Redis:
    """A Redis client for RQ (bytes replies, as RQ expects)."""
    return connect(url)


def ingest_queue(url: str, queue_name: str = DEFAULT_QUEUE,
                 connection: redis.Redis | None = None) -> Queue:
    """The RQ queue of ingest jobs on the pipeline's Redis."""
    return Queue(queue_name, connection=connection or rq_connection(url),
                 serializer=JSONSerializer, job_class=SpotlineJob)


def enqueue_ingest(paths: Iterable[str], captions: Sequence[str], settings: Settings, url: str,
                   queue_name: str = DEFAULT_QUEUE, source_id: str | None = None,
                   timeout_s: int = JOB_TIMEOUT_S) -> list[Job]:
    """One ingest job per path (video, image folder, image or TIL dataset); returns the jobs.

    Paths are not checked here: a bad one fails its job with the reason (see ``list_jobs``).
    The job carries these settings less the secret ones (``job_settings_env``): the worker
    publishes to its own Redis, with its own secrets.
    """
    env = job_settings_env(settings)
    queue = ingest_queue(url, queue_name)
    jobs = []
    for path in paths:
        spec = str(path)
        jobs.append(queue.enqueue(
            ingest_job, spec, list(captions), env, source_id,
            job_timeout=timeout_s, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
            description=f"ingest {redact_url(spec)}",
            meta={"spec": redact_url(spec), "published": 0, "total": None, "dropped": 0,
                  "rejected": 0, "read": 0}))
    return jobs


class _Progress:
    """Saves a job's progress into ``job.meta`` at most every META_EVERY_S seconds."""

    def __init__(self, job: Job | None, done_before: int) -> None:
        self.job = job
        self.done_before = done_before  # frames handled by earlier attempts
        self._last = 0.0

    def __call__(self, stats: PublishStats, force: bool = False) -> None:
        now = time.monotonic()
        if self.job is None or (not force and now - self._last < META_EVERY_S):
            return
        self._last = now
        meta = self.job.meta
        meta["published"] = int(meta.get("published_before", 0)) + stats.published
        meta["dropped"] = int(meta.get("dropped_before", 0)) + stats.dropped
        meta["rejected"] = int(meta.get("rejected_before", 0)) + stats.errors
        meta["read"] = self.done_before + stats.read
        if stats.total is not None:
            meta["total"] = self.done_before + stats.total
        self.job.save_meta()


def _remember_attempt(job: Job | None, stats: PublishStats, error: str) -> None:
    """Before a retry: keep the counts so the next attempt resumes after the frames done."""
    if job is None:
        return
    meta = job.meta
    meta["published_before"] = int(meta.get("published_before", 0)) + stats.published
    meta["dropped_before"] = int(meta.get("dropped_before", 0)) + stats.dropped
    meta["rejected_before"] = int(meta.get("rejected_before", 0)) + stats.errors
    meta["done"] = int(meta.get("done", 0)) + stats.read
    meta["last_error"] = error
    job.save_meta()


def ingest_job(spec: str, captions: list[str], settings_env_dict: dict[str, str],
               source_id: str | None = None) -> dict[str, Any] | Retry:
    """The RQ job: publish every frame of ``spec`` with block backpressure.

    Returns the counts and the first 100 rejected frames with their reasons (the job's result;
    the boxes are in the pipeline's results stream, by source id). Raises InputError for a bad
    input (the job fails with that reason); on TransportError returns ``Retry`` until RETRY_MAX
    retries are spent, then raises it.
    """
    job = get_current_job()
    # the job's own settings minus anything secret (or a Redis to publish to: the worker's
    # only), plus the worker's secrets
    env = {k: v for k, v in settings_env_dict.items()
           if k.startswith(ENV_PREFIX) and not _is_secret(k, str(v))}
    settings = load_settings(env={**env, **_WORKER["secrets"]})
    if _WORKER["url"]:
        settings = settings.replace(redis_url=_WORKER["url"])
    done = int(job.meta.get("done", 0)) if job is not None else 0
    progress = _Progress(job, done)
    stats = PublishStats()  # ours, so the counts survive a TransportError
    try:
        source = open_source(spec, captions, source_id=source_id)
    except InputError as exc:
        raise InputError(f"cannot ingest {redact_url(spec)}: {redact(str(exc))}") from None
    try:
        client = Client.connect(settings.redis_url, settings, via="job")
        try:
            publish_source(source, client, settings, policy=BLOCK, progress=False, skip=done,
                           on_progress=progress, stats=stats, keep_ids=False)
        finally:
            client.close()
    except TransportError as exc:
        retries = (job.number_of_retries or 0) if job is not None else RETRY_MAX
        _remember_attempt(job, stats, str(exc))
        if retries >= RETRY_MAX:
            raise TransportError(f"ingest {redact_url(spec)}: Redis unreachable after "
                                 f"{retries} retries: {exc}") from None
        log.warning("ingest %s: %s; retry %d of %d", redact_url(spec), exc, retries + 1,
                    RETRY_MAX)
        return Retry(max=RETRY_MAX, interval=RETRY_INTERVALS)
    progress(stats, force=True)
    meta = job.meta if job is not None else {}
    return {"spec": spec, "source_id": source.source_id,
            "published": int(meta.get("published", stats.published)),
            "dropped": int(meta.get("dropped", stats.dropped)),
            "rejected": int(meta.get("rejected", stats.errors)),
            "rejected_frames": [list(r) for r in stats.rejected[:100]]}


def run_jobs_worker(url: str, queue_name: str = DEFAULT_QUEUE, burst: bool = False,
                    fork: bool = True, with_scheduler: bool = True,
                    logging_level: str = "INFO", settings: Settings | None = None) -> bool:
    """Work the ingest queue (RQ ``Worker``; ``fork=False``: ``SimpleWorker``, in process).
    ``burst``: stop when the queue is empty. The scheduler (on by default) runs the delayed
    retries. Returns whether any job was run.

    Jobs publish to ``settings.redis_url`` (the worker's own settings), else to ``url``, with
    the secret settings of ``settings``; only ``JOB_FUNCTIONS`` run (``SpotlineJob``)."""
    _WORKER["url"] = (settings.redis_url if settings else "") or url
    _WORKER["secrets"] = _secret_env(settings) if settings else {}
    conn = rq_connection(url)
    queue = ingest_queue(url, queue_name, conn)
    cls = Worker if fork else SimpleWorker
    worker = cls([queue], connection=conn, serializer=JSONSerializer, job_class=SpotlineJob)
    return bool(worker.work(burst=burst, with_scheduler=with_scheduler,
                            logging_level=logging_level))


@dataclass(frozen=True)
class JobRow:
    """One ingest job as `spotline jobs list` shows it."""

    id: str
    status: str
    spec: str
    progress: str
    error: str | None

    def line(self) -> str:
        return (f"{self.id}  {self.status:<9} {self.spec}  {self.progress}"
                + (f"  error: {self.error}" if self.error else ""))


def _progress_text(meta: dict[str, Any]) -> str:
    total = meta.get("total")
    return (f"{meta.get('published', 0)}/{'?' if total is None else total} published, "
            f"{meta.get('dropped', 0)} dropped, {meta.get('rejected', 0)} rejected")


def _error_text(job: Job) -> str | None:
    result = job.latest_result()
    text = getattr(result, "exc_string", None) if result is not None else None
    if not text:
        return job.meta.get("last_error")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def list_jobs(url: str, queue_name: str = DEFAULT_QUEUE) -> list[JobRow]:
    """Every ingest job RQ still knows (queued, scheduled, started, finished, failed):
    id, status, progress and, for failed ones, the reason."""
    queue = ingest_queue(url, queue_name)
    ids: list[str] = list(queue.get_job_ids())
    for registry in (queue.scheduled_job_registry, queue.started_job_registry,
                     queue.finished_job_registry, queue.failed_job_registry,
                     queue.deferred_job_registry, queue.canceled_job_registry):
        ids += [i for i in registry.get_job_ids() if i not in ids]
    rows = []
    jobs = [j for j in SpotlineJob.fetch_many(ids, connection=queue.connection,
                                              serializer=JSONSerializer) if j is not None]
    jobs.sort(key=lambda j: (j.created_at.timestamp() if j.created_at else 0.0, j.id))
    for job in jobs:
        status = str(job.get_status(refresh=False).value)
        error = _error_text(job) if status == "failed" else None
        spec = redact_url(str(job.meta.get("spec", job.description)))
        rows.append(JobRow(job.id, status, spec, _progress_text(job.meta),
                           redact(error) if error else None))
    return rows


# The only functions the jobs worker runs, by the name RQ stores (module.qualname): the
# ingest job, and whatever spotline's own application layer registers (its fine-tuning job).
JOB_FUNCTIONS: dict[str, Any] = {}


def register_job(function: Any) -> Any:
    """Allow the jobs worker to run ``function`` (spotline's own job functions only: called
    at import by the module that defines one; a queued job can never add a name)."""
    JOB_FUNCTIONS[f"{function.__module__}.{function.__qualname__}"] = function
    return function


register_job(ingest_job)
