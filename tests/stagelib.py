"""Trivial stages for transport tests (test code only, not part of the product)."""

from __future__ import annotations

import os
import time

from spotline.common.envelope import Envelope
from spotline.common.settings import Settings
from spotline.stages.base import Routed, Stage


class PassThrough(Stage):
    """Reads the frames inbox and forwards every envelope unchanged to `score`."""

    name = "detect"
    delay_s = 0.0

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [("score", env) for env in batch]


class SlowPassThrough(PassThrough):
    """Holds each batch for a long time: a worker to kill mid-batch."""

    delay_s = 30.0


class FailOnBoom(PassThrough):
    """Raises for any batch holding a frame captioned 'boom' (a model that raises)."""

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if any("boom" in env.captions for env in batch):
            raise RuntimeError("model exploded")
        return super().process(batch)


class ToCollect(Stage):
    """A detect stage that finds nothing: every frame goes straight to the collector (which
    answers it with the fallback box), the cheapest full trip through real processes."""

    name = "detect"
    delay_s = 0.0

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [("collect", env.replace(image=None)) for env in batch]


class SlowToCollect(ToCollect):
    """ToCollect that holds each batch past the visibility timeout: its entries are claimed by
    another worker meanwhile, and it still commits them afterwards (a duplicate delivery)."""

    delay_s = 6.0


class RaisingDetect(Stage):
    """The real detect stage, whose model raises for any batch holding a frame captioned
    'boom' (a model that fails on one input)."""

    name = "detect"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        from spotline.stages.detect import Detect

        self.inner = Detect(settings)

    def setup(self) -> None:
        self.inner.setup()
        self.model_name, self.device_name = self.inner.model_name, self.inner.device_name

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if any("boom" in env.captions for env in batch):
            raise RuntimeError("detector exploded")
        return self.inner.process(batch)


class DiesOnCrash(PassThrough):
    """The process dies (as a segfault or the OOM killer would end it) on any batch holding a
    frame captioned 'crash': a worker that dies holding its batch, every time it meets it."""

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if any("crash" in env.captions for env in batch):
            os._exit(3)
        return super().process(batch)
