"""The seed's single-process method: the same stage objects, and the same batch runner
(common/runner.py) as the streaming pipeline, driven in-process without Redis
(detect → upscale → score → join parts → collect)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from spotline.common import runner, topology
from spotline.common.envelope import Envelope, Result
from spotline.common.settings import Settings
from spotline.stages import load_stage, runtime
from spotline.stages.base import Stage


class Reference:
    """identify(images, captions) in one process, with the pipeline's stage code."""

    def __init__(self, settings: Settings, setup: bool = True) -> None:
        # The seed's method answers each image on its own: track mode (video feeds, a stage
        # with its state in Redis) is not part of it (spotline/pipeline/trackmode.py runs that
        # in-process).
        settings = settings.replace(tracking=False)
        if settings.torch_threads == 0:  # one process runs every stage: every model on all
            # cores (a stage alone would load an exported model on its worker's share)
            settings = settings.replace(torch_threads=runtime.cpu_count())
        self.settings = settings
        self.stages: list[Stage] = [load_stage(name, settings)
                                    for name in topology.pipeline(settings)]
        if setup:
            self.setup()

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
        inbox: dict[str, list[Envelope | Result]] = {name: [] for name in topology.STAGES}
        inbox[topology.RESULT] = []
        inbox[topology.FRAMES] = [
            Envelope(frame_id=fid, source_id="reference", capture_time=now,
                     captions=tuple(caps), image=data)
            for fid, data, caps in zip(ids, images, captions, strict=True)]
        for stage in self.stages:
            envs: list[Envelope] = inbox[stage.name]  # type: ignore[assignment]
            if topology.is_last(stage.name):
                envs = runner.join_in_process(envs)
            for target, msg in runner.run_all(stage, envs, self.settings):
                inbox[target].append(msg)
        results = {r.frame_id: r for r in inbox[topology.RESULT]}
        return [results[fid] for fid in ids]  # type: ignore[misc]
