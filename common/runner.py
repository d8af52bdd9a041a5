"""One batch through one stage, with the pipeline's failure semantics, and no Redis.

``run_batch`` is what every stage's worker (common/worker.py, common/collector.py) and the
in-process reference (spotline/pipeline/reference.py) do with a batch, so both measure the
same thing:

- an envelope that already carries an error skips the model and goes where errors go
  (``topology.error_target``): the collector, which answers the frame with an error result;
- the rest go through ``stage.process`` together; if that raises, each goes through it alone,
  and one that fails alone is answered with an error naming the stage and the exception;
- ``traced`` adds each stage's timing row to what it sent on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from .envelope import Envelope, error_result, merge_parts, strip
from .logs import StageLog, about, frame_list
from .settings import Settings
from .stage import Routed, Stage
from .topology import RESULT, error_target

_log = logging.getLogger(__name__)

Pair = tuple[Envelope, list[Routed]]  # an input and everything it produced


class Observer:
    """What a runner reports (a worker turns it into metrics and counts). No-ops here."""

    def batch(self, stage: str, size: int) -> None:
        """A model call on ``size`` envelopes."""

    def outcome(self, stage: str, outcome: str, n: int = 1) -> None:
        """``n`` envelopes came out ``ok``, ``retried`` (alone, after the batch failed) or
        ``error`` (failed alone)."""

    def model_seconds(self, stage: str, per_item: float) -> None:
        """Model time per envelope of the last batch."""


def run_batch(stage: Stage, envs: Sequence[Envelope], settings: Settings,
              observer: Observer | None = None, log: logging.LoggerAdapter | None = None,
              entries: Mapping[str, str] | None = None) -> list[Pair]:
    """The stage on one batch: (input, its routed outputs) for every input, errored ones first.
    ``entries`` (frame id → stream entry id) only adds context to the log lines."""
    obs = observer or Observer()
    log = log or StageLog(_log, stage.name)
    entries = entries or {}
    pairs = [(e, [error_route(stage.name, e, e.error or "", settings)])
             for e in envs if e.error is not None]
    todo = [e for e in envs if e.error is None]
    if not todo:
        return pairs
    obs.batch(stage.name, len(todo))
    t0 = time.time()
    try:
        routed = stage.process(todo)
        pairs += group_by_frame(todo, routed)
        obs.outcome(stage.name, "ok", len(todo))
    except Exception as exc:  # noqa: BLE001 - any model failure: retry item by item
        log.warning("batch of %d failed (%s: %s); retrying item by item; %s", len(todo),
                    type(exc).__name__, exc, frame_list(e.frame_id for e in todo))
        for env in todo:
            pairs.append((env, _run_one(stage, env, settings, obs, log,
                                        entries.get(env.frame_id))))
    obs.model_seconds(stage.name, (time.time() - t0) / max(1, len(todo)))
    return pairs


def _run_one(stage: Stage, env: Envelope, settings: Settings, obs: Observer,
             log: logging.LoggerAdapter, entry: str | None) -> list[Routed]:
    try:
        routed = stage.process([env])
    except Exception as exc:  # noqa: BLE001 - this item's failure is answered, not raised
        reason = f"{stage.name} failed: {type(exc).__name__}: {exc}"
        log.error("%s %s", about(env.frame_id, entry), reason)
        obs.outcome(stage.name, "error")
        return [error_route(stage.name, env, reason, settings)]
    obs.outcome(stage.name, "retried")
    return routed


def error_route(stage: str, env: Envelope, reason: str, settings: Settings) -> Routed:
    """Where a frame that failed in ``stage`` goes: an error envelope (no pixels) to the
    collector, or, from the collector, an error result."""
    target = error_target(stage)
    if target == RESULT:
        return (RESULT, error_result(env, reason, settings.fallback_box))
    return (target, strip(env.replace(error=reason)))


def group_by_frame(inputs: Sequence[Envelope], routed: list[Routed]) -> list[Pair]:
    """Pair each input with the outputs of its frame (a stage may emit several per input)."""
    by_id: dict[str, list[Routed]] = {e.frame_id: [] for e in inputs}
    for target, msg in routed:
        by_id.setdefault(msg.frame_id, []).append((target, msg))
    first = {e.frame_id: e for e in inputs}
    return [(first[fid], outs) for fid, outs in by_id.items() if fid in first]


def traced(pairs: list[Pair], stage: str, enqueued: Mapping[str, float], started: float,
           finished: float) -> list[Routed]:
    """Every output with the stage's timing row (enqueued: by input frame id)."""
    out: list[Routed] = []
    for env_in, routed in pairs:
        enq = enqueued.get(env_in.frame_id, started)
        for target, msg in routed:
            out.append((target, msg.traced(stage, enq, started, finished)))
    return out


def merge_or_error(env: Envelope, parts: Sequence[Envelope],
                   log: logging.LoggerAdapter | None = None) -> Envelope:
    """A frame's parts joined into one envelope; parts that do not fit together (shapes that
    some other writer got wrong) give an error envelope for the frame instead of raising."""
    try:
        return merge_parts(list(parts))
    except Exception as exc:  # noqa: BLE001 - any failure here is this frame's, not the worker's
        reason = f"collect cannot join the parts: {type(exc).__name__}: {exc}"
        (log or _log).error("%s %s", about(env.frame_id), reason)
        return strip(env.replace(error=reason))


def join_in_process(parts: Sequence[Envelope]) -> list[Envelope]:
    """The collector's join without Redis: one envelope per frame, in first-seen order; an
    errored part answers its whole frame."""
    by_frame: dict[str, list[Envelope]] = {}
    for env in parts:
        by_frame.setdefault(env.frame_id, []).append(env)
    joined = []
    for group in by_frame.values():
        errored = [e for e in group if e.error is not None]
        joined.append(errored[0] if errored else merge_or_error(group[0], group))
    return joined


def run_all(stage: Stage, envs: Sequence[Envelope], settings: Settings) -> list[Routed]:
    """In-process: the stage on batches of its configured size, traced (no queue wait)."""
    errored = [e for e in envs if e.error is not None]
    todo = [e for e in envs if e.error is None]
    size = settings.batch_for(stage.name)
    batches = [errored] + [todo[i:i + size] for i in range(0, len(todo), size)]
    out: list[Routed] = []
    for batch in batches:
        if not batch:
            continue
        started = time.time()
        pairs = run_batch(stage, batch, settings)
        out += traced(pairs, stage.name, {}, started, time.time())
    return out


__all__ = ["Observer", "Pair", "error_route", "group_by_frame", "join_in_process",
           "merge_or_error", "run_all", "run_batch", "traced"]
