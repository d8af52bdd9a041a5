"""The seed's single-process method: the same stage objects and code as the streaming
pipeline, driven in-process without Redis (detect → upscale → score → merge parts → collect)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from spotline.common.envelope import Envelope, Result, error_result
from spotline.common.settings import Settings
from spotline.common.worker import merge_parts
from spotline.stages import runtime
from spotline.stages.base import RESULT, Stage
from spotline.stages.collect import Collect
from spotline.stages.detect import Detect
from spotline.stages.score import Score
from spotline.stages.upscale import Upscale

log = logging.getLogger(__name__)


class Reference:
    """identify(images, captions) in one process, with the pipeline's stage code."""

    def __init__(self, settings: Settings, setup: bool = True) -> None:
        self.settings = settings
        self.detect = Detect(settings)
        self.upscale = Upscale(settings) if settings.upscale else None
        self.score = Score(settings)
        self.collect = Collect(settings)
        if setup:
            self.setup()

    @property
    def stages(self) -> list[Stage]:
        """The stages in pipeline order (upscale only when on)."""
        found = [self.detect, self.upscale, self.score, self.collect]
        return [s for s in found if s is not None]

    def setup(self) -> None:
        """Load every model once (and warm up the detector)."""
        for stage in self.stages:
            stage.setup()
        runtime.set_threads(self.settings)  # one process runs every stage: all cores (auto)

    def identify(self, images: Sequence[bytes], captions: Sequence[Sequence[str]],
                 frame_ids: Sequence[str] | None = None) -> list[Result]:
        """One Result per image (same order): for each caption its [left, top, width, height]."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        ids = list(frame_ids) if frame_ids is not None else [f"ref-{i}" for i in range(len(images))]
        now = time.time()
        envs = [Envelope(frame_id=fid, source_id="reference", capture_time=now,
                         captions=tuple(caps), image=data)
                for fid, data, caps in zip(ids, images, captions, strict=True)]
        inbox: dict[str, list[Envelope]] = {"detect": envs, "upscale": [], "score": [],
                                            "collect": []}
        results: dict[str, Result] = {}
        for stage in self.stages[:-1]:
            for target, env in self._run(stage, inbox[stage.name]):
                inbox[target].append(env)
        for merged in self._merge(inbox["collect"]):
            for _target, result in self._run(self.collect, [merged]):
                results[result.frame_id] = result  # type: ignore[assignment]
        return [results[fid] for fid in ids]

    def _run(self, stage: Stage, envs: list[Envelope]) -> list[tuple[str, Envelope | Result]]:
        """The stage on batches of its configured size; a failing batch is retried item by
        item and a failing item is answered with an error (as the worker does)."""
        out: list[tuple[str, Envelope | Result]] = []
        size = self.settings.batch_for(stage.name)
        todo = [e for e in envs if e.error is None]
        out += [_error_route(stage, e, e.error or "", self.settings) for e in envs if e.error]
        for i in range(0, len(todo), size):
            out += self._run_batch(stage, todo[i:i + size])
        return out

    def _run_batch(self, stage: Stage,
                   batch: list[Envelope]) -> list[tuple[str, Envelope | Result]]:
        started = time.time()
        try:
            routed = stage.process(batch)
        except Exception as exc:  # noqa: BLE001 - mirrors the worker's item-by-item retry
            log.warning("reference %s batch failed (%s); retrying item by item", stage.name, exc)
            routed = []
            for env in batch:
                try:
                    routed += stage.process([env])
                except Exception as item_exc:  # noqa: BLE001
                    reason = f"{stage.name} failed: {type(item_exc).__name__}: {item_exc}"
                    routed.append(_error_route(stage, env, reason, self.settings))
        finished = time.time()
        return [(t, _traced(m, stage.name, started, finished)) for t, m in routed]

    @staticmethod
    def _merge(parts: list[Envelope]) -> list[Envelope]:
        """Join each frame's parts (an errored part answers the whole frame)."""
        by_frame: dict[str, list[Envelope]] = {}
        for env in parts:
            by_frame.setdefault(env.frame_id, []).append(env)
        merged = []
        for group in by_frame.values():
            errored = [e for e in group if e.error is not None]
            merged.append(errored[0] if errored else merge_parts(group))
        return merged


def _traced(msg: Envelope | Result, stage: str, started: float,
            finished: float) -> Envelope | Result:
    """Add the stage's timing row (queue wait is zero in-process), as the worker does."""
    if isinstance(msg, Envelope):
        return msg.traced(stage, started, started, finished)
    return msg.replace(trace=(*msg.trace, (stage, started, started, finished)),
                       finished_time=finished)


def _error_route(stage: Stage, env: Envelope, reason: str,
                 settings: Settings) -> tuple[str, Envelope | Result]:
    if stage.name == "collect":
        return (RESULT, error_result(env, reason, settings.fallback_box))
    return ("collect", env.replace(error=reason, image=None, crops=(), boxes=None,
                                   det_scores=None, scores=None, part=0, nparts=1))
