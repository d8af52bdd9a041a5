"""The pipeline's shape, and the only place that knows its order.

    frames → detect → [upscale] → score → collect → result
    frames → detect → track → collect → result                 (track mode: ``tracking``)

In track mode the track stage follows each source's boxes in sequence order and runs the
upscaler and the scorer itself, on the crops whose track has no usable cached embedding
(docs/architecture.md, "Tracks"), so upscale and score have no workers of their own.

Producers write frames to the inbox of ``FRAMES``; every stage reads its own inbox and sends
each output to ``next_stage(stage, settings)``; an errored frame skips to ``COLLECT``, which
joins a frame's parts and publishes its one result (``RESULT``: not a stream).
"""

from __future__ import annotations

from typing import Any

# Settings is passed in, not imported: settings.py reads STAGES from here.
Settings = Any

STAGES = ("detect", "upscale", "score", "collect")
FRAMES = STAGES[0]  # the stage whose inbox producers write: the frames inbox
COLLECT = STAGES[-1]  # joins a frame's parts and publishes its result
OPTIONAL = frozenset({"upscale"})  # stages a setting turns off
RESULT = "result"  # where the collector's output goes: the results stream and pub/sub
TRACK = "track"  # track mode's ordered stage (not in STAGES: off unless ``tracking``)
ALL_STAGES = (FRAMES, TRACK, *STAGES[1:])  # every stage that can have an inbox


def pipeline(settings: Settings) -> tuple[str, ...]:
    """The stages a frame goes through with these settings, in order."""
    if getattr(settings, "tracking", False):
        return (FRAMES, TRACK, COLLECT)
    return tuple(st for st in STAGES if st not in OPTIONAL or getattr(settings, st))


def next_stage(stage: str, settings: Settings) -> str:
    """Where ``stage`` sends its outputs: the next stage of the pipeline, or RESULT after the
    last one."""
    order = pipeline(settings)
    if stage not in order:
        raise ValueError(f"stage {stage!r} is not in the pipeline {order}")
    i = order.index(stage)
    return order[i + 1] if i + 1 < len(order) else RESULT


def error_target(stage: str) -> str:
    """Where ``stage`` sends a frame it failed on: the collector answers it (and the collector
    itself answers with a result)."""
    return RESULT if stage == COLLECT else COLLECT


def is_last(stage: str) -> bool:
    """Whether ``stage`` is the collector (publishes results instead of forwarding)."""
    return stage == COLLECT
