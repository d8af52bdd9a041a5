"""How many cores a model stage's process uses: a static share, or (``threads_policy``
``follow``) the cores that the other stages leave idle, decided before every batch.

Stages on one CPU that each used every core would fight: an OpenMP team that shares its cores
with another busy process waits on its slowest thread (2 cores, SigLIP-large: 2 threads 11 s
alone but 22 s beside a busy process; docs/performance.md). So when every model stage is busy
each takes its share (score, the slowest real-size model, half; detect and upscale a quarter
each). A fixed share, though, leaves the idle stages' cores unused: at light load a frame goes
through one stage at a time, each on its share. ``follow`` gives a stage the shares of the
stages that have nothing to do: alone, it runs on every core; with all busy, on its share,
exactly as ``static``. Pure functions of the stages' backlogs; the worker (common/worker.py)
reads the backlogs and the stage applies the count (stages/*.py ``use_threads``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

# Each model stage's weight in the split. Track mode's track stage runs the upscaler and the
# scorer on chosen crops: it weighs as both.
SHARES: Mapping[str, int] = {"detect": 1, "upscale": 1, "score": 2, "track": 3}


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def model_stages(stages: Iterable[str]) -> tuple[str, ...]:
    """The stages of a pipeline that run a model (and so take cores)."""
    return tuple(st for st in stages if st in SHARES)


def share(cores: int, stage: str, among: Iterable[str]) -> int:
    """``stage``'s share of ``cores`` when the stages ``among`` (``stage`` counts whether
    listed or not) are busy: cores × weight / total weight, rounded down, at least 1 and at
    most ``cores``."""
    busy = set(model_stages(among)) | {stage}
    total = sum(SHARES.get(st, 1) for st in busy)
    return max(1, min(cores, cores * SHARES.get(stage, 1) // total))


def static_threads(cores: int, stage: str | None, stages: Iterable[str]) -> int:
    """The fixed share: as if every model stage of the pipeline were busy. ``stage=None`` (or a
    stage that runs no model) is a process that runs every stage: all cores."""
    if stage is None or stage not in SHARES:
        return cores
    return share(cores, stage, stages)


def follow_threads(cores: int, stage: str, work: Mapping[str, int]) -> int:
    """The threads ``stage`` runs its next batch on, given the work waiting for or held by the
    other model stages (``work``: stage → entries unread plus entries in flight). The stages
    with no work lend their share to the busy ones: alone, ``stage`` takes every core; with
    every stage busy it takes its static share."""
    busy = [st for st, n in work.items() if n > 0 and st != stage]
    return share(cores, stage, busy)

