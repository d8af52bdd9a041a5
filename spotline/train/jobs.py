"""Fine-tuning runs as RQ jobs, like `spotline ingest`: ``--queue`` enqueues the run on the
pipeline's Redis and ``spotline jobs worker --queue spotline-train`` (on a GPU machine, say)
runs it. Progress (epoch, step, loss, validation figures) goes into ``job.meta``; arguments and
results are JSON (RQ's JSONSerializer), never pickle.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from rq import Queue, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer

from spotline.common.settings import Settings, load_settings
from spotline.common.transport import connect
from spotline.producer.jobs import job_settings_env, register_job

TRAIN_QUEUE = "spotline-train"
JOB_TIMEOUT_S = 7 * 24 * 3600
RESULT_TTL_S = 7 * 24 * 3600
META_EVERY_S = 1.0


def train_queue(url: str, queue_name: str = TRAIN_QUEUE) -> Queue:
    """The RQ queue of fine-tuning jobs on the pipeline's Redis."""
    return Queue(queue_name, connection=connect(url), serializer=JSONSerializer)


def enqueue_finetune(kind: str, run: Any, settings: Settings, url: str,
                     queue_name: str = TRAIN_QUEUE) -> Job:
    """Put one fine-tuning run (a ScorerRun or DetectorRun) on the queue."""
    if kind not in ("scorer", "detector"):
        raise ValueError(f"kind must be scorer or detector, got {kind!r}")
    args = dataclasses.asdict(run)
    args["progress"] = False
    return train_queue(url, queue_name).enqueue(
        finetune_job, kind, args, job_settings_env(settings), job_timeout=JOB_TIMEOUT_S,
        result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
        description=f"finetune {kind} {run.train} -> {run.out}",
        meta={"spec": f"finetune {kind} {run.train}", "phase": "queued"})


class _Meta:
    """Writes progress into job.meta at most every META_EVERY_S (epoch ends always)."""

    def __init__(self, job: Job | None) -> None:
        self.job = job
        self.last = 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.job is None or (info.get("phase") != "epoch" and now - self.last < META_EVERY_S):
            return
        self.last = now
        self.job.meta.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))
                              or v is None})
        if info.get("phase") == "epoch":
            self.job.meta.setdefault("epochs_done", [])
            self.job.meta["epochs_done"].append(info)
        self.job.save_meta()


@register_job
def finetune_job(kind: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The RQ job: run the fine-tuning and return its figures (JSON)."""
    job = get_current_job()
    settings = load_settings(env=env)
    meta = _Meta(job)
    if kind == "scorer":
        from spotline.train.scorer import ScorerRun, finetune_scorer

        result = finetune_scorer(ScorerRun(**args), settings, on_progress=meta, say=_log)
        return {"kind": kind, "model": str(result.final),
                "epochs": [dataclasses.asdict(e) for e in result.epochs]}
    from spotline.train.detector import DetectorRun, finetune_detector

    args["schedule"] = [tuple(p) for p in args.get("schedule", [])]
    det = finetune_detector(DetectorRun(**args), on_progress=meta, say=_log)
    return {"kind": kind, "model": str(det.weights), "map50": det.map50,
            "map50_95": det.map50_95, "epochs": det.epochs}


def _log(message: str) -> None:
    import logging

    logging.getLogger(__name__).info("%s", message)
